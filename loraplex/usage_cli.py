"""`loraplex usage` and `loraplex tenant quota`: what tenants used, and the limits they have.

Both read and write the loraplex home's registry directly. A running server commits usage every
second (registry/ledger.py), so `usage` may miss the last second of traffic; GET /admin/usage
asks the server, which commits first.
"""

import csv
import io
import json
from enum import Enum, StrEnum
from typing import Annotated

import typer
from rich.console import Console

from loraplex.cli_support import actor, fail, open_registry, or_fail
from loraplex.registry.ledger import COUNTERS, GROUPINGS
from loraplex.registry.quotas import LIMITS

GroupBy = Enum("GroupBy", {name: name for name in GROUPINGS}, type=str)


class Format(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def usage_command(
    tenant: Annotated[str, typer.Option(help="The tenant")],
    start: Annotated[str | None, typer.Option(
        "--from", help="First UTC hour or day counted, e.g. 2026-12-01 or 2026-12-01T18")] = None,
    end: Annotated[str | None, typer.Option(
        "--to", help="First UTC hour or day NOT counted: [--from, --to)")] = None,
    group_by: Annotated[GroupBy, typer.Option(help="One row per ...")] = GroupBy.day,
    output: Annotated[Format, typer.Option("--format", help="table, csv or json")] = Format.table,
):
    """A tenant's usage from the ledger: requests, errors and tokens, grouped."""
    rows = or_fail(open_registry().usage, tenant, start=start, end=end,
                   group_by=group_by.value)
    columns = [*GROUPINGS[group_by.value], *COUNTERS, "total_tokens"]
    if output is Format.json:
        typer.echo(json.dumps({"tenant": tenant, "group_by": group_by.value, "from": start,
                               "to": end, "data": rows}, indent=2))
    elif output is Format.csv:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        typer.echo(buffer.getvalue(), nl=False)
    else:
        from rich.table import Table

        table = Table(*columns, title=f"{tenant}: usage by {group_by.value}")
        for row in rows:
            table.add_row(*(str(row[c]) for c in columns))
        if not rows:
            table.caption = "no usage in this period"
        Console().print(table)


def _limit(text: str | None, name: str):
    """'none' lifts a limit; otherwise a positive integer."""
    if text is None or text.lower() == "none":
        return None
    if not text.isdigit():
        fail(f"--{name.replace('_', '-')} must be a positive integer or 'none', got {text!r}")
    return int(text)


def quota_command(
    tenant: str,
    tier: Annotated[float | None, typer.Option(
        help="Fairness weight: a tier-2 tenant gets twice a tier-1 tenant's service when both "
             "are busy")] = None,
    requests_per_minute: Annotated[str | None, typer.Option(help="or 'none'")] = None,
    tokens_per_minute: Annotated[str | None, typer.Option(
        help="prompt + completion tokens, or 'none'")] = None,
    max_concurrent: Annotated[str | None, typer.Option(
        help="requests in flight at once, or 'none' (the server's default)")] = None,
    monthly_tokens: Annotated[str | None, typer.Option(
        help="prompt + completion tokens per calendar month (UTC), or 'none'")] = None,
):
    """Show a tenant's quota and tier, or change the fields given."""
    given = {"requests_per_minute": requests_per_minute, "tokens_per_minute": tokens_per_minute,
             "max_concurrent": max_concurrent, "monthly_tokens": monthly_tokens}
    changes = {name: _limit(text, name) for name, text in given.items() if text is not None}
    if tier is not None:
        changes["tier"] = tier
    registry = open_registry()
    if changes:
        quota = or_fail(registry.set_quota, tenant, actor=actor(), **changes)
    else:
        quota = or_fail(registry.get_quota, tenant)
    parts = [f"tier {quota.tier:g}"] + [
        f"{name} {'-' if getattr(quota, name) is None else getattr(quota, name)}"
        for name in LIMITS]
    typer.echo(f"{tenant}: " + ", ".join(parts))

"""Per-tenant quotas and fairness tier, as the operator sets them.

A limit of None means none of that kind (for max_concurrent: the server's default). The tier is
the tenant's fairness weight in the engine: a tenant of tier 2 gets twice the service of a tier-1
tenant when both are busy.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass, fields, replace

from loraplex.registry.errors import InvalidInput

LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrent", "monthly_tokens")
MAX_TIER = 1000.0


@dataclass(frozen=True)
class Quota:
    tier: float = 1.0  # fairness weight
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # prompt + completion, counted as in the ledger
    max_concurrent: int | None = None  # requests in flight at once
    monthly_tokens: int | None = None  # prompt + completion per calendar month (UTC)


def check(quota: Quota) -> Quota:
    """The quota itself, or InvalidInput naming the first bad field."""
    tier = quota.tier
    if isinstance(tier, bool) or not isinstance(tier, int | float) or not (
            math.isfinite(tier) and 0 < tier <= MAX_TIER):
        raise InvalidInput(f"tier must be a number in (0, {MAX_TIER:g}], got {tier!r}")
    for name in LIMITS:
        value = getattr(quota, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise InvalidInput(f"{name} must be a positive integer or none, got {value!r}")
    return replace(quota, tier=float(tier))


def get_quota(conn: sqlite3.Connection, tenant_id: int) -> Quota:
    row = conn.execute("SELECT * FROM quotas WHERE tenant_id = ?", (tenant_id,)).fetchone()
    if row is None:
        return Quota()
    return Quota(**{f.name: row[f.name] for f in fields(Quota)})


def set_quota(conn: sqlite3.Connection, tenant_id: int, quota: Quota) -> None:
    quota = check(quota)
    names = [f.name for f in fields(Quota)]
    conn.execute(
        f"INSERT OR REPLACE INTO quotas (tenant_id, {', '.join(names)})"
        f" VALUES (?, {', '.join('?' for _ in names)})",
        (tenant_id, *(getattr(quota, n) for n in names)),
    )

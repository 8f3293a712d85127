"""`loraplex data ...`: tenants' datasets in the vault of the loraplex home."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from loraplex.cli_support import actor, or_fail

data_app = typer.Typer(help="Tenants' training datasets (JSONL, encrypted at rest).",
                       no_args_is_help=True)

def _vault():
    from loraplex.home import loraplex_home
    from loraplex.vault import Vault

    return or_fail(Vault, loraplex_home())


@data_app.command("add")
def data_add(
    tenant: str,
    name: str,
    file: Annotated[Path, typer.Argument(help="JSONL: chat messages or prompt/completion")],
):
    """Validate FILE and store it, encrypted, as the next version of TENANT's dataset NAME."""
    with _vault() as vault:
        version = or_fail(vault.add, tenant, name, file, actor=actor())
    typer.echo(f"{tenant}/{name} {version.label}: {version.num_records} records, "
               f"sha256 {version.sha256[:12]}")


@data_app.command("list")
def data_list(tenant: str):
    """TENANT's datasets and their versions."""
    from rich.table import Table

    with _vault() as vault:
        versions = or_fail(vault.list, tenant)
    table = Table("dataset", "version", "records", "bytes", "sha256", "created", "by")
    for v in versions:
        table.add_row(v.name, v.label, str(v.num_records), str(v.size_bytes), v.sha256[:12],
                      v.created_at, v.created_by)
    Console().print(table)


@data_app.command("rm")
def data_rm(tenant: str, name: str):
    """Delete every version of TENANT's dataset NAME, files included."""
    with _vault() as vault:
        versions = or_fail(vault.remove, tenant, name, actor=actor())
    typer.echo(f"{tenant}/{name} deleted ({', '.join(v.label for v in versions)})")

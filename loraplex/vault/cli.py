"""`loraplex data ...`: tenants' datasets in the vault of the loraplex home."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from loraplex.cli_support import actor, fail, or_fail

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


@data_app.command("shred")
def data_shred(tenant: str, yes: Annotated[bool, typer.Option(
        "--yes", help="Confirm: the tenant's datasets and adapters become unreadable for good")
        ] = False):
    """Crypto-shred TENANT: destroy its vault key, so its datasets and adapter artifacts (and
    their backups) can never be read again, and delete them and its serving-cache entries."""
    if not yes:
        fail(f"this destroys every dataset and adapter of {tenant} for good; add --yes")
    with _vault() as vault:
        or_fail(vault.delete_tenant_vault, tenant, actor=actor())
    typer.echo(f"{tenant}: vault key destroyed; datasets and adapters deleted")

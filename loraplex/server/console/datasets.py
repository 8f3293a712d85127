"""A tenant's datasets in the vault: upload JSONL (bad lines named with their numbers), the
versions, and delete, which crypto-shreds every version (after typing the name to confirm)."""

import asyncio
from itertools import groupby
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile

from loraplex.server.console.context import PREFIX, Console, render
from loraplex.server.console.forms import text
from loraplex.server.console.guard import (
    ConsoleRoute,
    FormError,
    checked_form,
    signed_in,
    tenant_scope,
)
from loraplex.server.console.sessions import Session
from loraplex.server.console.tenants import see_other


def dataset_routes(console: Console) -> APIRouter:
    router = APIRouter(prefix=f"{PREFIX}/tenants/{{tenant}}/datasets", route_class=ConsoleRoute)
    Signed = Annotated[Session, Depends(signed_in(console))]
    vault = console.vault

    @router.get("")
    async def datasets(request: Request, tenant: str, session: Signed):
        tenant_scope(console, session, tenant)
        versions = await asyncio.to_thread(vault.list, tenant)
        grouped = [(name, list(group)) for name, group in groupby(versions, lambda v: v.name)]
        return render(request, "datasets.html", tenant=tenant, datasets=grouped)

    @router.post("")
    async def upload(request: Request, tenant: str, session: Signed):
        tenant_scope(console, session, tenant)
        form = await checked_form(request, session)
        name = text(form, "name")
        upload = form.get("file")
        if not isinstance(upload, UploadFile) or not upload.filename:
            raise FormError("file: choose a JSONL file")
        data = await upload.read(vault.max_dataset_bytes + 1)
        if len(data) > vault.max_dataset_bytes:
            raise FormError(f"file: larger than {vault.max_dataset_bytes} bytes (the limit)")
        await asyncio.to_thread(vault.add, tenant, name, data, actor=session.actor)
        return see_other(f"{PREFIX}/tenants/{tenant}/datasets")

    @router.post("/{name}/delete")
    async def delete(request: Request, tenant: str, name: str, session: Signed):
        """Every version's key is destroyed: the ciphertext left anywhere is unreadable."""
        tenant_scope(console, session, tenant)
        form = await checked_form(request, session)
        if text(form, "confirm", required=False) != name:
            raise FormError(f"confirm: type the dataset's name ({name}) to delete it")
        await asyncio.to_thread(vault.remove, tenant, name, actor=session.actor)
        return see_other(f"{PREFIX}/tenants/{tenant}/datasets")

    return router

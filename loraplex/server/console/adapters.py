"""Adapters and their versions: upload (operator), versions with their training records and
sha256, the deployment's split, promote and rollback (operator), live per-version counters."""

import asyncio
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from loraplex.server.admin import parse_split
from loraplex.server.console.context import PREFIX, Console, render
from loraplex.server.console.forms import checkbox, files, text, version_number
from loraplex.server.console.guard import (
    ConsoleRoute,
    FormError,
    checked_form,
    operator_only,
    signed_in,
    tenant_scope,
)
from loraplex.server.console.sessions import Session
from loraplex.server.console.tenants import see_other
from loraplex.server.console.uploads import save_adapter_files
from loraplex.server.prewarm import prewarm_serving, warm_before_traffic, warm_or_log

WEIGHT_FIELD = "weight_"  # weight_v1, weight_v2, ...: one slider per version


def adapter_routes(console: Console) -> APIRouter:
    router = APIRouter(prefix=f"{PREFIX}/tenants/{{tenant}}/adapters", route_class=ConsoleRoute)
    Signed = Annotated[Session, Depends(signed_in(console))]
    registry, engine, sealer = console.registry, console.engine, console.sealer

    def page(tenant: str, name: str) -> str:
        return f"{PREFIX}/tenants/{tenant}/adapters/{name}"

    @router.get("")
    async def adapters(request: Request, tenant: str, session: Signed):
        tenant_scope(console, session, tenant)
        return render(request, "adapters.html", tenant=tenant,
                      adapters=registry.list_adapters(tenant))

    @router.post("")
    async def upload(request: Request, tenant: str, session: Signed):
        """A new version (v1 creates the adapter) from a PEFT folder, its files, or a zip."""
        operator_only(session)
        tenant_scope(console, session, tenant)
        form = await checked_form(request, session)
        name = text(form, "name")
        with tempfile.TemporaryDirectory(prefix="loraplex-upload-") as tmp:
            save_adapter_files(files(form, "files"), Path(tmp),
                               console.serving.settings.max_upload_bytes)
            version = await asyncio.to_thread(
                registry.push_version, tenant, name, Path(tmp), actor=session.actor,
                validate=console.validate, sealer=sealer, promote=checkbox(form, "promote"))
        await warm_or_log(engine, registry, sealer, tenant, name, version.number)
        return see_other(page(tenant, name))

    @router.get("/{name}")
    async def adapter(request: Request, tenant: str, name: str, session: Signed):
        tenant_scope(console, session, tenant)
        return render(request, "adapter.html", tenant=tenant, adapter=registry.show_adapter(
            tenant, name), stats=registry.version_stats(tenant, name),
            history=registry.deployment_history(tenant, name)[-10:][::-1])

    @router.get("/{name}/stats")
    async def stats(request: Request, tenant: str, name: str, session: Signed):
        """The per-version counters alone: the adapter page polls this."""
        tenant_scope(console, session, tenant)
        return render(request, "partials/version_stats.html", tenant=tenant,
                      adapter=registry.show_adapter(tenant, name),
                      stats=registry.version_stats(tenant, name))

    @router.post("/{name}/split")
    async def split(request: Request, tenant: str, name: str, session: Signed):
        operator_only(session)
        form = await checked_form(request, session)
        weights = {}
        for field, value in form.items():
            if field.startswith(WEIGHT_FIELD) and isinstance(value, str) and value.strip():
                if not value.strip().isdigit():
                    raise FormError(f"{field}: expected a whole number 0-100, got {value!r}")
                weights[field.removeprefix(WEIGHT_FIELD)] = int(value)
        parsed = parse_split(weights)
        await warm_before_traffic(engine, registry, sealer, tenant, name,
                                  [number for number, weight in parsed.items() if weight > 0])
        registry.split(tenant, name, parsed, actor=session.actor)
        return see_other(page(tenant, name))

    @router.post("/{name}/promote")
    async def promote(request: Request, tenant: str, name: str, session: Signed):
        operator_only(session)
        form = await checked_form(request, session)
        number = version_number(text(form, "version"))
        await warm_before_traffic(engine, registry, sealer, tenant, name, [number])
        registry.promote(tenant, name, number, actor=session.actor)
        return see_other(page(tenant, name))

    @router.post("/{name}/rollback")
    async def rollback(request: Request, tenant: str, name: str, session: Signed):
        operator_only(session)
        await checked_form(request, session)
        registry.rollback(tenant, name, actor=session.actor)
        return see_other(page(tenant, name))

    @router.post("/{name}/prewarm")
    async def prewarm(request: Request, tenant: str, name: str, session: Signed):
        operator_only(session)
        form = await checked_form(request, session)
        await prewarm_serving(engine, registry, sealer, tenant, name, checkbox(form, "pin"),
                              session.actor)
        return see_other(page(tenant, name))

    return router

"""GGUF exports (operator): merged or adapter-only, a dtype, one click; the file and its
Modelfile to download when ready."""

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, PlainTextResponse

from loraplex.export.gguf import DTYPES
from loraplex.server.console.context import PREFIX, Console, render
from loraplex.server.console.forms import text, version_number
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

KINDS = {"merged": False, "adapter-only": True}  # the form's choice -> adapter_only


def export_routes(console: Console) -> APIRouter:
    router = APIRouter(prefix=f"{PREFIX}/tenants/{{tenant}}/exports", route_class=ConsoleRoute)
    Signed = Annotated[Session, Depends(signed_in(console))]
    exports = console.exports

    def allowed(session: Session, tenant: str) -> None:
        operator_only(session)
        tenant_scope(console, session, tenant)

    def jobs_of(tenant: str):
        return sorted(exports.list(tenant), key=lambda j: j.created_at, reverse=True)

    @router.get("")
    async def page(request: Request, tenant: str, session: Signed):
        allowed(session, tenant)
        return render(request, "exports.html", tenant=tenant, jobs=jobs_of(tenant),
                      adapters=console.registry.list_adapters(tenant), dtypes=list(DTYPES),
                      kinds=list(KINDS))

    @router.get("/jobs")
    async def jobs(request: Request, tenant: str, session: Signed):
        allowed(session, tenant)
        return render(request, "partials/exports.html", tenant=tenant, jobs=jobs_of(tenant))

    @router.post("")
    async def start(request: Request, tenant: str, session: Signed):
        allowed(session, tenant)
        form = await checked_form(request, session)
        name, _, version = text(form, "version").partition("@")
        kind = text(form, "kind")
        if kind not in KINDS:
            raise FormError(f"kind: one of {', '.join(KINDS)}, got {kind!r}")
        exports.start(tenant, name, version_number(version), text(form, "dtype"),
                      adapter_only=KINDS[kind], actor=session.actor)
        return see_other(f"{PREFIX}/tenants/{tenant}/exports")

    @router.get("/{job_id}/gguf")
    async def download(request: Request, tenant: str, job_id: str, session: Signed):
        allowed(session, tenant)
        path = exports.file(job_id, tenant, "gguf")
        return FileResponse(path, filename=path.name, media_type="application/octet-stream")

    @router.get("/{job_id}/modelfile")
    async def modelfile(request: Request, tenant: str, job_id: str, session: Signed):
        allowed(session, tenant)
        path = exports.file(job_id, tenant, "modelfile")
        return PlainTextResponse(path.read_text(), headers={
            "content-disposition": f'attachment; filename="{path.name}"'})

    return router

"""Tenants (operator: list, create), a tenant's overview, its keys and its quota."""

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse

from loraplex.registry.quotas import LIMITS
from loraplex.server.console.context import PREFIX, Console, render
from loraplex.server.console.forms import checkbox, integer, number, text
from loraplex.server.console.guard import (
    ConsoleRoute,
    checked_form,
    operator_only,
    signed_in,
    tenant_scope,
)
from loraplex.server.console.sessions import Session


def see_other(url: str) -> RedirectResponse:
    """After a change: the page that shows it (POST, redirect, GET)."""
    return RedirectResponse(url, status_code=303)


def tenant_routes(console: Console) -> APIRouter:
    router = APIRouter(prefix=PREFIX, route_class=ConsoleRoute)
    Signed = Annotated[Session, Depends(signed_in(console))]
    registry = console.registry

    @router.get("/tenants")
    async def tenants(request: Request, session: Signed):
        operator_only(session)
        rows = [(t, len(registry.list_adapters(t.name))) for t in registry.list_tenants()]
        return render(request, "tenants.html", tenants=rows)

    @router.post("/tenants")
    async def create_tenant(request: Request, session: Signed):
        operator_only(session)
        form = await checked_form(request, session)
        name = text(form, "name")
        registry.create_tenant(name, actor=session.actor)
        if checkbox(form, "allow_base_model"):
            registry.set_base_model_access(name, True, actor=session.actor)
        return see_other(f"{PREFIX}/tenants/{name}")

    @router.get("/tenants/{tenant}")
    async def overview(request: Request, tenant: str, session: Signed):
        tenant_scope(console, session, tenant)
        tenant_id = registry.get_tenant(tenant).id
        keys = registry.list_keys(tenant) if session.is_admin else []
        return render(request, "tenant.html", tenant=tenant, keys=keys,
                      quota=registry.get_quota(tenant), limits=LIMITS,
                      base_model=console.base_model_name,
                      may_use_base=registry.tenant_may_use_base(tenant_id),
                      adapters=registry.list_adapters(tenant))

    @router.post("/tenants/{tenant}/keys")
    async def create_key(request: Request, tenant: str, session: Signed):
        operator_only(session)
        await checked_form(request, session)
        key_id, key = registry.create_key(tenant, actor=session.actor)
        return render(request, "key_created.html", tenant=tenant, key_id=key_id, key=key)

    @router.post("/tenants/{tenant}/keys/{key_id}/revoke")
    async def revoke_key(request: Request, tenant: str, key_id: str, session: Signed):
        operator_only(session)
        await checked_form(request, session)
        registry.revoke_key(key_id, actor=session.actor, tenant=tenant)
        return see_other(f"{PREFIX}/tenants/{tenant}#keys")

    @router.post("/tenants/{tenant}/quota")
    async def set_quota(request: Request, tenant: str, session: Signed):
        """Every field at once, as the form shows them: a blank limit is no limit."""
        operator_only(session)
        form = await checked_form(request, session)
        changes = {name: integer(form, name) for name in LIMITS}
        registry.set_quota(tenant, actor=session.actor, tier=number(form, "tier", default=1.0),
                           **changes)
        return see_other(f"{PREFIX}/tenants/{tenant}#quota")

    @router.post("/tenants/{tenant}/base-model")
    async def base_model_access(request: Request, tenant: str, session: Signed):
        operator_only(session)
        form = await checked_form(request, session)
        registry.set_base_model_access(tenant, checkbox(form, "allowed"), actor=session.actor)
        return see_other(f"{PREFIX}/tenants/{tenant}")

    return router

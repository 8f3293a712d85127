"""The operator's views of the whole server: the engine (slots, host cache, pins, KV use,
tokens/s; pre-warm) and the audit log (filterable)."""

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from loraplex.server.console.context import PREFIX, Console, render
from loraplex.server.console.forms import checkbox, text
from loraplex.server.console.guard import ConsoleRoute, checked_form, operator_only, signed_in
from loraplex.server.console.sessions import Session
from loraplex.server.console.tenants import see_other
from loraplex.server.prewarm import prewarm_serving

ADAPTER_LISTS = ("adapters_in_slots", "adapters_in_host_cache", "pinned")  # of version ids
MAX_AUDIT_ROWS = 1000


def version_names(console: Console) -> dict[int, str]:
    """Version id (the engine's adapter id) -> "tenant/adapter:vN", for every version."""
    names = {}
    for tenant in console.registry.list_tenants():
        for info in console.registry.list_adapters(tenant.name):
            for version in info.versions:
                names[version.id] = f"{tenant.name}/{info.name}:{version.label}"
    return names


def operator_routes(console: Console) -> APIRouter:
    router = APIRouter(prefix=PREFIX, route_class=ConsoleRoute)
    Signed = Annotated[Session, Depends(signed_in(console))]
    registry = console.registry

    async def engine_view() -> dict:
        stats = await console.engine.stats()
        names = version_names(console)
        lists = {key: [names.get(i, f"id {i}") for i in stats.get(key, [])]
                 for key in ADAPTER_LISTS}
        scalars = {k: v for k, v in stats.items()
                   if k not in ADAPTER_LISTS and not isinstance(v, dict | list)}
        total, free = stats.get("kv_blocks_total"), stats.get("kv_blocks_free")
        kv_used = None if not total else (total - free) / total
        return {"stats": scalars, "lists": lists, "kv_used": kv_used,
                "config": console.engine.engine.config}

    @router.get("/engine")
    async def engine(request: Request, session: Signed):
        operator_only(session)
        adapters = [(t.name, info.name) for t in registry.list_tenants()
                    for info in registry.list_adapters(t.name)]
        return render(request, "engine.html", adapters=adapters, **await engine_view())

    @router.get("/engine/stats")
    async def engine_stats(request: Request, session: Signed):
        operator_only(session)
        return render(request, "partials/engine_stats.html", **await engine_view())

    @router.post("/engine/prewarm")
    async def prewarm(request: Request, session: Signed):
        operator_only(session)
        form = await checked_form(request, session)
        tenant, _, name = text(form, "adapter").partition("/")
        await prewarm_serving(console.engine, registry, console.sealer, tenant, name,
                              checkbox(form, "pin"), session.actor)
        return see_other(f"{PREFIX}/engine")

    @router.get("/audit")
    async def audit(request: Request, session: Signed, tenant: str = "", action: str = "",
                    actor: str = "", limit: int = 100):
        operator_only(session)
        limit = max(1, min(limit, MAX_AUDIT_ROWS))
        entries = registry.audit_log(limit=MAX_AUDIT_ROWS, tenant=tenant or None)
        entries = [e for e in entries if e.action.startswith(action) and actor in e.actor]
        return render(request, "audit.html", entries=entries[:limit], tenant=tenant,
                      action=action, actor=actor, limit=limit,
                      tenants=[t.name for t in registry.list_tenants()])

    return router

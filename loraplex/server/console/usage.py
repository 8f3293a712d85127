"""Usage over time from the ledger: one tenant's (its own session or the operator), and every
tenant's side by side (operator), each as a chart and a table."""

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from loraplex.server.admin import usage_report
from loraplex.server.console.chart import bar_chart
from loraplex.server.console.context import PREFIX, Console, render
from loraplex.server.console.guard import ConsoleRoute, operator_only, signed_in, tenant_scope
from loraplex.server.console.sessions import Session

GROUPINGS = ("day", "hour")  # what a chart's x axis can be


def _grouping(group_by: str) -> str:
    return group_by if group_by in GROUPINGS else "day"


def _series(rows: list[dict], group_by: str) -> list[tuple[str, int]]:
    return [(row[group_by], row["total_tokens"]) for row in rows]


def usage_routes(console: Console) -> APIRouter:
    router = APIRouter(prefix=PREFIX, route_class=ConsoleRoute)
    Signed = Annotated[Session, Depends(signed_in(console))]

    async def report(tenants: list[str], start: str | None, group_by: str) -> dict:
        return await usage_report(console.registry, console.ledger, tenants, start or None,
                                  None, group_by)

    @router.get("/tenants/{tenant}/usage")
    async def tenant_usage(request: Request, tenant: str, session: Signed,
                           start: str | None = Query(None, alias="from"), group_by: str = "day"):
        tenant_scope(console, session, tenant)
        group_by = _grouping(group_by)
        rows = (await report([tenant], start, group_by))["data"]
        return render(request, "usage.html", tenant=tenant, group_by=group_by, start=start,
                      groupings=GROUPINGS,
                      charts=[(tenant, bar_chart(_series(rows, group_by)), rows)])

    @router.get("/usage")
    async def all_usage(request: Request, session: Signed,
                        start: str | None = Query(None, alias="from"), group_by: str = "day"):
        operator_only(session)
        group_by = _grouping(group_by)
        rows = (await report([t.name for t in console.registry.list_tenants()], start,
                             group_by))["data"]
        charts = []
        for tenant in console.registry.list_tenants():
            mine = [row for row in rows if row["tenant"] == tenant.name]
            charts.append((tenant.name, bar_chart(_series(mine, group_by)), mine))
        return render(request, "usage.html", tenant=None, group_by=group_by, start=start,
                      groupings=GROUPINGS, charts=charts)

    return router

"""The web console under /console: server-rendered pages (Jinja2 templates) made live with
htmx (vendored in static/, no CDN), for the operator (admin key) and for each tenant (its own
key). A thin layer like the API routes: parse the form, call the same registry, vault and
queue functions the HTTP API calls, render. One module per area:

signin (sessions in, out) · tenants (tenants, keys, quotas) · adapters (versions, split,
promote, rollback) · datasets · training · exports (GGUF) · usage (charts) · operator (engine,
audit) · playground (two models side by side, streamed); guard.py says who may do what.
"""

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from loraplex.server.console.adapters import adapter_routes
from loraplex.server.console.context import HERE, PREFIX, Console
from loraplex.server.console.datasets import dataset_routes
from loraplex.server.console.exports import export_routes
from loraplex.server.console.operator import operator_routes
from loraplex.server.console.playground import playground_routes
from loraplex.server.console.signin import signin_routes
from loraplex.server.console.tenants import tenant_routes
from loraplex.server.console.training import training_routes
from loraplex.server.console.usage import usage_routes

__all__ = ["Console", "mount_console"]


def mount_console(app: FastAPI, console: Console) -> None:
    app.state.console = console
    app.mount(f"{PREFIX}/static", StaticFiles(directory=HERE / "static"), name="console_static")
    for routes in (signin_routes, tenant_routes, adapter_routes, dataset_routes,
                   training_routes, export_routes, usage_routes, operator_routes,
                   playground_routes):
        app.include_router(routes(console), include_in_schema=False)

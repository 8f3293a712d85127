"""The HTTP app: the OpenAI-compatible API (server/routes/: chat, completions, models, files,
fine-tuning jobs, webhook endpoints), the admin and tenant-data routes, health and metrics,
behind one set of middleware and error handlers.

Every failure is an OpenAI-style error body with the right status; one tenant's bad request
never reaches the engine, and one tenant cannot tell another's adapters from missing ones.
"""

import sqlite3
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from loraplex.engine.async_engine import AsyncEngine
from loraplex.export.jobs import ExportJobs
from loraplex.registry import AlreadyExists, InvalidInput, NotFound, Registry, RegistryError
from loraplex.registry.fine_tuning import FineTuningStore
from loraplex.registry.ledger import LedgerWriter
from loraplex.server.admin import admin_router
from loraplex.server.auth import Authenticator, FailedAuthThrottle
from loraplex.server.console import Console, mount_console
from loraplex.server.console.sessions import SessionStore
from loraplex.server.metrics import Metrics
from loraplex.server.openapi import ERROR_RESPONSES
from loraplex.server.prewarm import prewarm_at_start
from loraplex.server.protocol import OpenAIError
from loraplex.server.routes.chat import Chat, chat_router
from loraplex.server.routes.completions import completions_router
from loraplex.server.routes.files import files_router
from loraplex.server.routes.fine_tuning import fine_tuning_router
from loraplex.server.routes.models import models_router
from loraplex.server.routes.webhooks import webhooks_router
from loraplex.server.serving import VERSION_HEADER, ServerSettings, Serving
from loraplex.server.tenant_data import tenant_data_router
from loraplex.storage import CODE as STORAGE_FULL_CODE
from loraplex.storage import StorageFull, is_storage_full
from loraplex.train.fine_tuning import FineTuning
from loraplex.train.jobs import TrainingJobs
from loraplex.vault import Vault
from loraplex.vault.artifacts import ArtifactSealer, seal_clear_artifacts
from loraplex.webhooks import WebhookSender

__all__ = ["VERSION_HEADER", "ServerSettings", "create_app"]


def _validation_message(error: dict) -> tuple[str, str | None]:
    """(message, param) for pydantic's first complaint; an unknown field is named as OpenAI
    names it."""
    where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
    if error.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {where}", where
    message = error.get("msg", "invalid request")
    return (f"{where}: {message}" if where else message), where or None


def create_app(
    engine: AsyncEngine, registry: Registry, settings: ServerSettings, validate=None,
    jobs: TrainingJobs | None = None,
) -> FastAPI:
    """`validate(files)` checks uploads against the base model (validation.py); `jobs`
    runs /tenants/{tenant}/training-jobs (default: one job at a time, on the served model)."""
    metrics = Metrics()
    vault = Vault(registry.home)
    sealer = ArtifactSealer(vault)
    # A home from before sealing: its adapters are encrypted now, once, before serving.
    seal_clear_artifacts(registry, sealer, actor="server:seal-clear-artifacts")
    if jobs is None:
        jobs = TrainingJobs(registry.home, str(engine.engine.config.model))
    ledger = LedgerWriter(registry.add_usage, settings.ledger_flush_seconds)
    auth = Authenticator(registry, FailedAuthThrottle(
        settings.max_auth_failures, settings.auth_failure_window_s,
        settings.max_auth_failure_addresses), metrics.rejected)
    serving = Serving(engine, registry, settings, metrics, ledger, sealer, auth)
    store = FineTuningStore(registry.home)
    webhooks = WebhookSender(store, allow_private=settings.allow_private_webhooks,
                             retry_delays_s=settings.webhook_retry_delays_s)
    fine_tuning = FineTuning(registry, vault, jobs, store, webhooks, settings.base_model_name)
    exports = ExportJobs(registry, sealer, str(engine.engine.config.model))

    @asynccontextmanager
    async def lifespan(_app):
        await prewarm_at_start(engine, registry, sealer, settings.prewarm_adapters)
        yield
        engine.shutdown()  # after uvicorn has let running requests finish (graceful SIGTERM)
        serving.close()
        ledger.close()  # commits what the last requests used
        fine_tuning.close()
        jobs.close()  # waiting fine-tuning jobs stay queued in the registry for the next start
        exports.close()
        webhooks.close()
        store.close()
        vault.close()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan,
                  responses=ERROR_RESPONSES)
    app.state.engine, app.state.registry, app.state.settings = engine, registry, settings
    app.state.metrics = metrics

    @app.exception_handler(OpenAIError)
    async def _openai_error(_request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RegistryError)
    async def _registry_error(_request, exc: RegistryError):
        status = {NotFound: 404, AlreadyExists: 409, InvalidInput: 400}.get(type(exc), 400)
        return JSONResponse(OpenAIError(status, str(exc)).body(), status_code=status)

    @app.exception_handler(OSError)
    @app.exception_handler(sqlite3.OperationalError)
    async def _storage_full(request: Request, exc: Exception):
        """A full disk under the home is a 507 naming it (the request was fine: retry once
        there is room); any other I/O failure stays a server error."""
        if not is_storage_full(exc):
            raise exc
        message = str(exc if isinstance(exc, StorageFull)
                      else StorageFull(f"{request.method} {request.url.path}"))
        error = OpenAIError(507, message, "server_error", code=STORAGE_FULL_CODE)
        return JSONResponse(error.body(), status_code=507)

    @app.exception_handler(HTTPException)
    async def _http_error(_request, exc: HTTPException):
        """FastAPI's own refusals (no such route, a method the route lacks, a body it cannot
        parse, such as JSON nested too deeply) in the same shape as every other error."""
        error = OpenAIError(exc.status_code, str(exc.detail))
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        message, param = _validation_message(exc.errors()[0] if exc.errors() else {})
        metrics.rejected.labels("invalid").inc()
        return JSONResponse(OpenAIError(400, message, param=param).body(), status_code=400)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        path = request.url.path
        # The console's forms upload adapters and datasets; its playground asks like /v1 does.
        is_upload = path.startswith(("/admin/", "/tenants/", "/v1/files", "/console/")) \
            and not path.startswith("/console/playground")
        limit = settings.max_upload_bytes if is_upload else settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            error = OpenAIError(413, f"request body larger than {limit} bytes")
            return JSONResponse(error.body(), status_code=413)
        return await call_next(request)

    @app.middleware("http")
    async def _rate_limit_headers(request: Request, call_next):
        """Every answer to a tenant's key carries its x-ratelimit-* standing."""
        response = await call_next(request)
        response.headers.update(getattr(request.state, "rate_limit_headers", {}))
        return response

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not engine.is_alive():
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ready"}

    @app.get("/health")
    async def health():
        """vLLM's route, which load generators (GuideLLM) and gateways call first: 200 with an
        empty body while the engine runs."""
        return Response(status_code=200 if engine.is_alive() else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(await engine.stats()),
                        media_type="text/plain; version=0.0.4")

    app.include_router(chat_router(serving))
    app.include_router(completions_router(serving))
    app.include_router(models_router(serving))
    app.include_router(admin_router(registry, engine, ledger, sealer, auth, validate))
    app.include_router(files_router(serving, vault))
    app.include_router(fine_tuning_router(serving, fine_tuning, store))
    app.include_router(webhooks_router(serving, store, webhooks))
    app.include_router(tenant_data_router(registry, vault, jobs, ledger, store, auth))
    sessions = SessionStore(settings.console_session_s, settings.max_console_sessions)
    mount_console(app, Console(registry, vault, jobs, exports, sealer, engine, ledger, serving,
                               auth, Chat(serving), sessions, validate))
    return app

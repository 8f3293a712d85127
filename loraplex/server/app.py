"""The OpenAI-compatible HTTP API: authenticate, resolve the tenant's adapter, run, answer.

Every failure is an OpenAI-style error body with the right status; one tenant's bad request
never reaches the engine, and one tenant cannot tell another's adapters from missing ones.
"""

import asyncio
import json
import time
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loraplex.engine.async_engine import AsyncEngine, StreamDelta
from loraplex.engine.sequence import AdapterRequest
from loraplex.registry import AlreadyExists, InvalidInput, NotFound, Registry, RegistryError
from loraplex.registry.ledger import FLUSH_SECONDS, LedgerWriter, UsageKey, hour_of
from loraplex.server.admin import admin_router
from loraplex.server.auth import bearer_key
from loraplex.server.metrics import Metrics
from loraplex.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    new_id,
    now,
)
from loraplex.server.quotas import QuotaExceeded, QuotaGate
from loraplex.server.tenant_data import tenant_data_router
from loraplex.train.jobs import TrainingJobs
from loraplex.vault import Vault

DISCONNECT_POLL_SECONDS = 0.25
VERSION_HEADER = "x-loraplex-adapter-version"


@dataclass
class ServerSettings:
    base_model_name: str  # the name under which tenants allowed to may call the base model
    max_body_bytes: int = 1 << 20  # for /v1 requests; adapter uploads have their own limit
    max_upload_bytes: int = 1 << 30
    max_tokens_cap: int = 4096  # the most a single request may ask to generate
    max_concurrent_per_tenant: int = 32  # a tenant's default max_concurrent quota; beyond: 429
    max_in_flight: int = 512  # all tenants together; beyond this: 503
    ledger_flush_seconds: float = FLUSH_SECONDS  # how much usage a crash may lose, at most


@dataclass(frozen=True)
class Target:
    """What a request's `model` resolved to."""

    adapter: AdapterRequest | None  # None: the base model
    labels: tuple[str, str, str]  # (tenant, adapter name, version): metrics and the ledger
    version_id: int | None


def create_app(
    engine: AsyncEngine, registry: Registry, settings: ServerSettings, validate=None,
    jobs: TrainingJobs | None = None,
) -> FastAPI:
    """`validate(adapter_dir)` checks uploads against the base model (validation.py); `jobs`
    runs /tenants/{tenant}/training-jobs (default: one job at a time, on the served model)."""
    metrics = Metrics()
    vault = Vault(registry.home)
    if jobs is None:
        jobs = TrainingJobs(registry.home, str(engine.engine.config.model))
    ledger = LedgerWriter(registry.add_usage, settings.ledger_flush_seconds)
    quotas = QuotaGate(registry, ledger, settings.max_concurrent_per_tenant)
    # Per-version counters, written off the event loop (finish() may run outside it).
    stats_writer = ThreadPoolExecutor(1, thread_name_prefix="loraplex-stats")
    tokenizer = engine.tokenizer
    max_model_len = engine.engine.max_model_len

    @asynccontextmanager
    async def lifespan(_app):
        yield
        engine.shutdown()  # after uvicorn has let running requests finish (graceful SIGTERM)
        stats_writer.shutdown()
        ledger.close()  # commits what the last requests used
        jobs.close()
        vault.close()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.registry, app.state.settings = engine, registry, settings
    app.state.metrics = metrics

    @app.exception_handler(OpenAIError)
    async def _openai_error(_request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RegistryError)
    async def _registry_error(_request, exc: RegistryError):
        status = {NotFound: 404, AlreadyExists: 409, InvalidInput: 400}.get(type(exc), 400)
        return JSONResponse(OpenAIError(status, str(exc)).body(), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get(
            "msg", "invalid request")
        metrics.rejected.labels("invalid").inc()
        return JSONResponse(OpenAIError(400, message, param=where or None).body(),
                            status_code=400)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        is_upload = request.url.path.startswith(("/admin/", "/tenants/"))
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

    def authenticate(request: Request):
        principal = registry.authenticate(bearer_key(request))
        if principal is None or principal.role != "tenant":
            raise OpenAIError(401, "invalid or revoked API key", "authentication_error",
                              code="invalid_api_key")
        request.state.rate_limit_headers = quotas.headers(principal.tenant_id)
        return principal

    def resolve(principal, model: str, user: str | None) -> Target:
        tenant = principal.tenant_name
        if model == settings.base_model_name and registry.tenant_may_use_base(principal.tenant_id):
            return Target(None, (tenant, model, "base"), None)
        try:
            found = registry.resolve(principal.tenant_id, model, user or principal.key_id)
        except NotFound:
            # The same answer whether the name is missing or another tenant's: no leak.
            raise OpenAIError(404, f"The model '{model}' does not exist or you do not have "
                              "access to it.", param="model", code="model_not_found") from None
        return Target(AdapterRequest(found.version_id, str(found.artifact_path)),
                      (tenant, model, f"v{found.number}"), found.version_id)

    def admit(request: Request, principal, estimated_tokens: int):
        """Reserve the request against the server's capacity and the tenant's quota."""
        if quotas.in_flight() >= settings.max_in_flight:
            metrics.rejected.labels("queue_full").inc()
            raise OpenAIError(503, "the server is at capacity; retry shortly", "server_error",
                              headers={"Retry-After": "1"})
        try:
            ticket = quotas.admit(principal.tenant_id, estimated_tokens)
        except QuotaExceeded as e:
            metrics.rejected.labels(e.limit).inc()
            raise
        request.state.rate_limit_headers = ticket.headers
        return ticket

    def max_tokens_for(body, prompt_len: int) -> int:
        room = max_model_len - prompt_len
        if room < 1:
            raise OpenAIError(400, f"the prompt has {prompt_len} tokens; this server's context "
                              f"length is {max_model_len}", param="messages",
                              code="context_length_exceeded")
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if asked is None:
            return min(settings.max_tokens_cap, room)
        if asked > settings.max_tokens_cap:
            raise OpenAIError(400, f"max_tokens {asked} is above this server's cap of "
                              f"{settings.max_tokens_cap}", param="max_tokens")
        return min(asked, room)

    async def run(request: Request, principal, target: Target, prompt_ids, params,
                  chat: bool, stream: bool, include_usage: bool):
        ticket = admit(request, principal, len(prompt_ids) + params.n * params.max_tokens)
        started = time.monotonic()
        state = {"ttft": None, "queue": None, "prompt": len(prompt_ids), "status": "ok",
                 "settled": False}
        completion: dict[int, int] = {}  # tokens generated so far, per completion

        async def deltas() -> AsyncIterator[StreamDelta]:
            try:
                async for delta in engine.generate(prompt_ids, params, target.adapter,
                                                   fairness_key=principal.tenant_name,
                                                   fairness_weight=ticket.quota.tier):
                    if state["ttft"] is None and delta.token_ids:
                        state["ttft"] = time.monotonic() - started
                    if state["queue"] is None:
                        state["queue"] = delta.queue_seconds
                    completion[delta.index] = delta.completion_tokens
                    if delta.finished and delta.error:
                        state["status"] = "error"
                    yield delta
            except asyncio.CancelledError:
                state["status"] = "aborted"
                raise
            except ValueError as e:  # refused by the engine: a clear message, no traceback
                state["status"] = "invalid"
                raise OpenAIError(400, str(e)) from None

        def finish():
            if state["settled"]:
                return
            state["settled"], status = True, state["status"]
            latency = time.monotonic() - started
            # What a refused prompt never cost is not billed; what was computed is.
            prompt = 0 if status == "invalid" else state["prompt"]
            generated = sum(completion.values())
            quotas.settle(ticket, prompt + generated)
            ledger.record(UsageKey(principal.tenant_id, principal.key_id, target.labels[1],
                                   target.labels[2], hour_of(datetime.now(UTC))),
                          errors=int(status in ("error", "invalid")),
                          prompt_tokens=prompt, completion_tokens=generated)
            metrics.observe_request(target.labels, status, prompt, generated,
                                    state["ttft"], latency, state["queue"])
            if target.version_id is not None:
                stats_writer.submit(lambda: registry.record_request(
                    target.version_id, prompt_tokens=prompt,
                    completion_tokens=generated, latency_ms=latency * 1e3,
                    ttft_ms=None if state["ttft"] is None else state["ttft"] * 1e3,
                    error=status != "ok"))

        response_id = new_id("chatcmpl" if chat else "cmpl")
        with_logprobs = params.logprobs is not None
        # Which version of the adapter answered: what an A/B comparison needs per response.
        headers = {VERSION_HEADER: target.labels[2]}
        if stream:
            async def sse():
                try:
                    async for chunk in _stream_chunks(deltas(), response_id, target, chat,
                                                      tokenizer, include_usage, with_logprobs):
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                except OpenAIError as e:
                    yield f"data: {json.dumps(e.body())}\n\n"
                finally:
                    finish()

            body = sse()
            # A client gone before the stream starts never runs sse(): settle when it is dropped.
            weakref.finalize(body, finish)
            return StreamingResponse(body, media_type="text/event-stream", headers=headers)
        try:
            collected = await _collect_unless_disconnected(request, deltas())
        finally:
            finish()
        return JSONResponse(_full_response(collected, response_id, target, chat, tokenizer,
                                           params.n, with_logprobs), headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        principal = authenticate(request)
        target = resolve(principal, body.model, body.user)
        try:
            prompt_ids = tokenizer.encode_chat([m.model_dump() | {"content": m.text()}
                                                for m in body.messages])
        except ValueError as e:
            raise OpenAIError(400, str(e), param="messages") from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = _params(body, max_tokens_for(body, len(prompt_ids)), logprobs)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await run(request, principal, target, prompt_ids, params, True, body.stream,
                         include_usage)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        principal = authenticate(request)
        target = resolve(principal, body.model, body.user)
        if isinstance(body.prompt, str):
            prompt_ids = tokenizer.encode(body.prompt)
        else:
            if not all(0 <= t < tokenizer.vocab_size for t in body.prompt):
                raise OpenAIError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})",
                                  param="prompt")
            prompt_ids = list(body.prompt)
        params = _params(body, max_tokens_for(body, len(prompt_ids)), body.logprobs)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await run(request, principal, target, prompt_ids, params, False, body.stream,
                         include_usage)

    @app.get("/v1/models")
    async def list_models(request: Request):
        principal = authenticate(request)
        names = [a.name for a in registry.list_adapters(principal.tenant_name)]
        if registry.tenant_may_use_base(principal.tenant_id):
            names.insert(0, settings.base_model_name)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": principal.tenant_name}
            for name in names]}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not engine.is_alive():
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(await engine.stats()),
                        media_type="text/plain; version=0.0.4")

    app.include_router(admin_router(registry, engine, ledger, validate))
    app.include_router(tenant_data_router(registry, vault, jobs, ledger))
    return app


def _params(body, max_tokens: int, logprobs: int | None):
    try:
        return body.sampling_params(max_tokens, logprobs)
    except ValueError as e:
        raise OpenAIError(400, str(e), param=str(e).split(" ", 1)[0]) from None


async def _collect_unless_disconnected(request: Request, deltas) -> list[StreamDelta]:
    """Gather a non-streaming request's deltas; abort if the client goes away meanwhile."""
    async def gather():
        return [d async for d in deltas]

    task = asyncio.ensure_future(gather())
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
        if not task.done() and await request.is_disconnected():
            task.cancel()  # the engine aborts the request when its stream is cancelled
            raise OpenAIError(499, "client closed the request")
    return task.result()


def _finish_reason(delta: StreamDelta) -> str | None:
    if not delta.finished:
        return None
    return {"stop": "stop", "length": "length"}.get(delta.finish_reason, delta.finish_reason)


def _logprobs_chat(delta: StreamDelta, tokenizer) -> dict:
    content = []
    for token, logprob, top in zip(delta.token_ids, delta.logprobs, delta.top_logprobs,
                                   strict=True):
        alternatives = [{"token": tokenizer.decode([t], skip_special_tokens=False),
                         "logprob": lp} for t, lp in top.items()]
        content.append({"token": tokenizer.decode([token], skip_special_tokens=False),
                        "logprob": logprob, "top_logprobs": alternatives})
    return {"content": content}


def _logprobs_completion(delta: StreamDelta, tokenizer) -> dict:
    tokens = [tokenizer.decode([t], skip_special_tokens=False) for t in delta.token_ids]
    return {
        "tokens": tokens,
        "token_logprobs": delta.logprobs,
        "top_logprobs": [{tokenizer.decode([t], skip_special_tokens=False): lp
                          for t, lp in top.items()} for top in delta.top_logprobs],
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _stream_chunks(deltas, response_id, target: Target, chat: bool, tokenizer,
                         include_usage: bool, with_logprobs: bool):
    model = target.labels[1]
    prompt_tokens, completion_tokens = 0, {}
    async for delta in deltas:
        if delta.error:
            raise_error = OpenAIError(500 if "engine error" in delta.error else 400, delta.error)
            yield raise_error.body()
            return
        prompt_tokens = delta.prompt_tokens
        completion_tokens[delta.index] = delta.completion_tokens
        if not delta.text and not delta.finished and not delta.logprobs:
            continue
        if chat:
            choice = {"index": delta.index, "delta": {"role": "assistant", "content": delta.text},
                      "finish_reason": _finish_reason(delta),
                      "logprobs": _logprobs_chat(delta, tokenizer) if with_logprobs else None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": delta.index, "text": delta.text,
                      "finish_reason": _finish_reason(delta),
                      "logprobs": _logprobs_completion(delta, tokenizer) if with_logprobs
                      else None}
            obj = "text_completion"
        yield {"id": response_id, "object": obj, "created": now(), "model": model,
               "choices": [choice]}
    if include_usage:
        yield {"id": response_id, "object": "chat.completion.chunk" if chat else
               "text_completion", "created": now(), "model": model, "choices": [],
               "usage": _usage(prompt_tokens, sum(completion_tokens.values()))}


def _full_response(deltas: list[StreamDelta], response_id, target: Target, chat: bool,
                   tokenizer, n: int, with_logprobs: bool) -> dict:
    by_index: dict[int, list[StreamDelta]] = {}
    for d in deltas:
        by_index.setdefault(d.index, []).append(d)
    last = [by_index[i][-1] for i in range(n)]
    errors = [d.error for d in last if d.error]
    if errors:
        raise OpenAIError(500 if "engine error" in errors[0] else 400, errors[0])
    choices = []
    for i in range(n):
        parts = by_index[i]
        merged = StreamDelta(
            request_id=parts[-1].request_id, index=i, text="".join(p.text for p in parts),
            token_ids=[t for p in parts for t in p.token_ids],
            logprobs=[x for p in parts for x in p.logprobs],
            top_logprobs=[x for p in parts for x in p.top_logprobs], finished=True,
            finish_reason=parts[-1].finish_reason, error=None,
            prompt_tokens=parts[-1].prompt_tokens, completion_tokens=parts[-1].completion_tokens,
            queue_seconds=parts[-1].queue_seconds)
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": merged.text},
                            "finish_reason": _finish_reason(merged),
                            "logprobs": _logprobs_chat(merged, tokenizer) if with_logprobs
                            else None})
        else:
            choices.append({"index": i, "text": merged.text,
                            "finish_reason": _finish_reason(merged),
                            "logprobs": _logprobs_completion(merged, tokenizer) if with_logprobs
                            else None})
    usage = _usage(last[0].prompt_tokens, sum(d.completion_tokens for d in last))
    return {"id": response_id, "object": "chat.completion" if chat else "text_completion",
            "created": now(), "model": target.labels[1], "choices": choices, "usage": usage}

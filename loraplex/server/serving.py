"""What the generation routes share: who is asking (a FastAPI dependency), which adapter version
answers, the server's and the tenant's limits, and running a request to a streamed or a whole
answer with its usage metered, billed and counted exactly once."""

import asyncio
import json
import time
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from loraplex.config import (
    AUTH_FAILURE_WINDOW_S,
    MAX_AUTH_FAILURE_ADDRESSES,
    MAX_AUTH_FAILURES,
    ConfigError,
)
from loraplex.engine.async_engine import AsyncEngine, StreamDelta
from loraplex.engine.sequence import AdapterRequest
from loraplex.registry import NotFound, Registry
from loraplex.registry.ledger import FLUSH_SECONDS, LedgerWriter, UsageKey, hour_of
from loraplex.sampling_params import SamplingParams, SamplingParamsError
from loraplex.server.auth import Authenticator
from loraplex.server.metrics import Metrics
from loraplex.server.protocol import OpenAIError
from loraplex.server.quotas import QuotaExceeded, QuotaGate
from loraplex.vault.artifacts import ArtifactSealer
from loraplex.webhooks import RETRY_DELAYS_S

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
    # Webhooks to http:// URLs and private addresses (a closed network); else https to public
    # addresses only, so a tenant cannot make the server call into its own network.
    allow_private_webhooks: bool = False
    # Adapter versions loaded at start, most recently used first (None: as many as the engine's
    # host cache holds; 0: none), so that no first request after a restart pays a disk read.
    prewarm_adapters: int | None = None
    webhook_retry_delays_s: tuple[float, ...] = RETRY_DELAYS_S  # after a failed delivery
    # Failed authentications one client address may make per auth_failure_window_s; beyond,
    # its failures get 429 with Retry-After (a valid key still works: server/auth.py).
    max_auth_failures: int = MAX_AUTH_FAILURES
    auth_failure_window_s: float = AUTH_FAILURE_WINDOW_S
    # Addresses whose failures are remembered at once; the least recently failing is forgotten
    # first, so a flood from many addresses costs bounded memory (~100 bytes an address).
    max_auth_failure_addresses: int = MAX_AUTH_FAILURE_ADDRESSES
    # The web console (server/console/): a signed-in session lasts this long, then asks for the
    # key again; at most max_console_sessions live at once (the oldest is signed out first).
    console_session_s: float = 8 * 3600.0
    max_console_sessions: int = 10_000

    def __post_init__(self):
        for name in ("max_auth_failures", "auth_failure_window_s", "max_auth_failure_addresses"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class Target:
    """What a request's `model` resolved to."""

    adapter: AdapterRequest | None  # None: the base model
    labels: tuple[str, str, str]  # (tenant, adapter name, version): metrics and the ledger
    version_id: int | None


class Shaper(Protocol):
    """Turns a request's deltas into its endpoint's response bodies."""

    def chunks(self, deltas: AsyncIterator[StreamDelta]) -> AsyncIterator[dict]: ...

    def whole(self, deltas: list[StreamDelta]) -> dict: ...


def adapter_request(sealer: ArtifactSealer, tenant: str, version_id: int, path) -> AdapterRequest:
    """What the engine gets for a registry version: its id, and a reader that decrypts the
    artifact in memory (the engine never reads it from disk); its serving-cache entries are
    kept under the tenant, so that shredding the tenant's vault deletes them."""
    return AdapterRequest(version_id, str(path), read_files=sealer.reader(tenant, path),
                          cache_scope=tenant)


class Serving:
    def __init__(self, engine: AsyncEngine, registry: Registry, settings: ServerSettings,
                 metrics: Metrics, ledger: LedgerWriter, sealer: ArtifactSealer,
                 auth: Authenticator):
        self.engine, self.registry, self.settings = engine, registry, settings
        self.sealer, self.auth = sealer, auth
        self.metrics, self.ledger = metrics, ledger
        self.quotas = QuotaGate(registry, ledger, settings.max_concurrent_per_tenant)
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        # Per-version counters, written off the event loop (finish() may run outside it).
        self.stats_writer = ThreadPoolExecutor(1, thread_name_prefix="loraplex-stats")

    def close(self) -> None:
        self.stats_writer.shutdown()

    # -- dependencies -----------------------------------------------------------------------
    def authenticate(self, request: Request):
        """The tenant behind the request's key (a FastAPI dependency); 401 otherwise."""
        principal = self.auth.principal(request)
        if principal is None or principal.role != "tenant":
            raise OpenAIError(401, "invalid or revoked API key", "authentication_error",
                              code="invalid_api_key")
        request.state.rate_limit_headers = self.quotas.headers(principal.tenant_id)
        return principal

    def has_capacity(self) -> None:
        """All tenants together may hold `max_in_flight` requests (a FastAPI dependency)."""
        if self.quotas.in_flight() >= self.settings.max_in_flight:
            self.metrics.rejected.labels("queue_full").inc()
            raise OpenAIError(503, "the server is at capacity; retry shortly", "server_error",
                              headers={"Retry-After": "1"})

    # -- a request --------------------------------------------------------------------------
    def resolve(self, principal, model: str, user: str | None) -> Target:
        tenant = principal.tenant_name
        if model == self.settings.base_model_name and self.registry.tenant_may_use_base(
                principal.tenant_id):
            return Target(None, (tenant, model, "base"), None)
        try:
            found = self.registry.resolve(principal.tenant_id, model, user or principal.key_id)
        except NotFound:
            # The same answer whether the name is missing or another tenant's: no leak.
            raise OpenAIError(404, f"The model '{model}' does not exist or you do not have "
                              "access to it.", param="model", code="model_not_found") from None
        adapter = adapter_request(self.sealer, tenant, found.version_id, found.artifact_path)
        return Target(adapter, (tenant, model, f"v{found.number}"), found.version_id)

    def max_tokens_for(self, body, prompt_len: int) -> int:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise OpenAIError(400, f"the prompt has {prompt_len} tokens; this server's context "
                              f"length is {self.max_model_len}", param="messages",
                              code="context_length_exceeded")
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        cap = self.settings.max_tokens_cap
        if asked is None:
            return min(cap, room)
        if asked > cap:
            raise OpenAIError(400, f"max_tokens {asked} is above this server's cap of {cap}",
                              param="max_tokens")
        return min(asked, room)

    def _admit(self, request: Request, principal, estimated_tokens: int):
        """Reserve the request against the tenant's quota."""
        try:
            ticket = self.quotas.admit(principal.tenant_id, estimated_tokens)
        except QuotaExceeded as e:
            self.metrics.rejected.labels(e.limit).inc()
            raise
        request.state.rate_limit_headers = ticket.headers
        return ticket

    async def run(self, request: Request, principal, target: Target, prompt_ids: list[int],
                  params: SamplingParams, shaper: Shaper, stream: bool):
        ticket = self._admit(request, principal, len(prompt_ids) + params.n * params.max_tokens)
        meter = _Meter(self, principal, target, ticket, len(prompt_ids))

        async def deltas() -> AsyncIterator[StreamDelta]:
            try:
                async for delta in self.engine.generate(prompt_ids, params, target.adapter,
                                                        fairness_key=principal.tenant_name,
                                                        fairness_weight=ticket.quota.tier):
                    meter.observe(delta)
                    yield delta
            except asyncio.CancelledError:
                meter.status = "aborted"
                raise
            except ValueError as e:  # refused by the engine: a clear message, no traceback
                meter.status = "invalid"
                raise OpenAIError(400, str(e)) from None

        # Which version of the adapter answered: what an A/B comparison needs per response.
        headers = {VERSION_HEADER: target.labels[2]}
        if stream:
            async def sse():
                try:
                    async for chunk in shaper.chunks(deltas()):
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                except OpenAIError as e:
                    yield f"data: {json.dumps(e.body())}\n\n"
                finally:
                    meter.settle()

            body = sse()
            # A client gone before the stream starts never runs sse(): settle when it is dropped.
            weakref.finalize(body, meter.settle)
            return StreamingResponse(body, media_type="text/event-stream", headers=headers)
        try:
            collected = await _collect_unless_disconnected(request, deltas())
        finally:
            meter.settle()
        return JSONResponse(shaper.whole(collected), headers=headers)


@dataclass
class _Meter:
    """One request's accounting: what it used, billed exactly once when it ends (quota, ledger,
    metrics, the version's counters), however it ends."""

    serving: Serving
    principal: object
    target: Target
    ticket: object
    prompt_tokens: int
    started: float = field(default_factory=time.monotonic)
    ttft: float | None = None
    queue: float | None = None
    status: str = "ok"  # "ok" | "error" | "invalid" (refused by the engine) | "aborted"
    completion: dict[int, int] = field(default_factory=dict)  # tokens so far, per completion
    settled: bool = False

    def observe(self, delta: StreamDelta) -> None:
        if self.ttft is None and delta.token_ids:
            self.ttft = time.monotonic() - self.started
        if self.queue is None:
            self.queue = delta.queue_seconds
        self.completion[delta.index] = delta.completion_tokens
        if delta.finished and delta.error:
            self.status = "error"

    def settle(self) -> None:
        if self.settled:
            return
        self.settled = True
        s, target, status = self.serving, self.target, self.status
        latency = time.monotonic() - self.started
        # What a refused prompt never cost is not billed; what was computed is.
        prompt = 0 if status == "invalid" else self.prompt_tokens
        generated = sum(self.completion.values())
        s.quotas.settle(self.ticket, prompt + generated)
        s.ledger.record(UsageKey(self.principal.tenant_id, self.principal.key_id,
                                 target.labels[1], target.labels[2], hour_of(datetime.now(UTC))),
                        errors=int(status in ("error", "invalid")),
                        prompt_tokens=prompt, completion_tokens=generated)
        s.metrics.observe_request(target.labels, status, prompt, generated, self.ttft, latency,
                                  self.queue)
        if target.version_id is not None:
            ttft_ms = None if self.ttft is None else self.ttft * 1e3
            s.stats_writer.submit(lambda: s.registry.record_request(
                target.version_id, prompt_tokens=prompt, completion_tokens=generated,
                latency_ms=latency * 1e3, ttft_ms=ttft_ms, error=status != "ok"))


def sampling_params(body, max_tokens: int, logprobs: int | None, grammar=None) -> SamplingParams:
    """The request's SamplingParams; a 400 naming the field that is wrong."""
    try:
        return body.sampling_params(max_tokens, logprobs, grammar)
    except SamplingParamsError as e:
        raise OpenAIError(400, str(e), param=str(e).split(" ", 1)[0]) from None
    except ValueError as e:  # a logit_bias key that is no token id
        raise OpenAIError(400, str(e), param="logit_bias") from None


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

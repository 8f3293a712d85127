"""The gateway: loraplex's own HTTP app (server/app.py, unchanged) over the engine replicas.

Authentication, limits, registry resolution, traffic splits, metrics and SSE streaming are the
single-machine server's code; only the engine it is handed is different: a RemoteEngine, which
forwards each request to an EngineReplica through a Serve handle tagged with the adapter
version id, so Serve routes it to a replica that already holds that version.
"""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle

from loraplex.config import EngineConfig
from loraplex.engine.async_engine import StreamDelta
from loraplex.engine.guided import GrammarCompiler
from loraplex.engine.sequence import AdapterRequest
from loraplex.model.pull import resolve_model
from loraplex.model.tokenizer import Tokenizer
from loraplex.registry import Registry
from loraplex.sampling_params import SamplingParams
from loraplex.server.app import ServerSettings, create_app
from loraplex.validation import adapter_validator

MAX_ATTEMPTS = 3  # a request whose replica died before its client saw anything is sent again
RETRY_DELAY_S = 0.5  # time for Serve's routers to drop the dead replica
STATS_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class EngineInfo:
    """What the HTTP app reads of a local engine's LLMEngine (`engine.engine`)."""

    config: EngineConfig
    max_model_len: int


class RemoteEngine:
    """The surface of AsyncEngine that create_app and the admin routes use, served by the
    EngineReplica deployment."""

    def __init__(self, replicas: DeploymentHandle, info: EngineInfo):
        self.replicas = replicas
        self.engine = info
        self.tokenizer = Tokenizer(resolve_model(info.config.model))
        # Grammars are compiled here to refuse a bad one before it is sent (the replica compiles
        # its own for the model's logits).
        self.grammars = GrammarCompiler(self.tokenizer, self.tokenizer.vocab_size)

    def _handle(self, adapter: AdapterRequest | None) -> DeploymentHandle:
        if adapter is None:  # the base model: any replica will do
            return self.replicas
        return self.replicas.options(multiplexed_model_id=str(adapter.adapter_id))

    async def generate(self, prompt: list[int], params: SamplingParams,
                       adapter: AdapterRequest | None = None, *, fairness_key: str = "",
                       fairness_weight: float = 1.0) -> AsyncIterator[StreamDelta]:
        """AsyncEngine.generate on a replica. If the replica dies before the client was shown
        anything (StreamDelta.shows_anything), the request goes to another one; after that,
        every unfinished completion ends with an engine error, as a failed local engine would
        end it."""
        handle = self._handle(adapter).options(stream=True)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            last: dict[int, StreamDelta] = {}  # completion index -> its latest delta
            seen = False  # whether a delta the HTTP app turns into a chunk went out
            stream = handle.generate.remote(prompt, params, adapter, fairness_key,
                                            fairness_weight)
            is_done = False
            try:
                async for delta in stream:
                    last[delta.index] = delta
                    seen = seen or delta.shows_anything
                    yield delta
                is_done = True
                return
            except (RayActorError, RayTaskError) as e:
                is_done = True
                cause = e.cause if isinstance(e, RayTaskError) else e
                if isinstance(cause, ValueError):  # a refused request: the same 400 as locally
                    raise ValueError(str(cause)) from None
                if not isinstance(cause, RayActorError):
                    failure = f"{type(cause).__name__}: {cause}"
                elif not seen and attempt < MAX_ATTEMPTS:
                    await asyncio.sleep(RETRY_DELAY_S)
                    continue
                else:
                    failure = "the replica serving this request was lost"
            finally:
                if not is_done:  # the consumer left early: stop the work on the replica
                    stream.cancel()
            for index in range(params.n):
                previous = last.get(index)
                if previous is None or not previous.finished:
                    yield _error_delta(previous, index, len(prompt), f"engine error: {failure}")
            return

    async def prewarm(self, adapter: AdapterRequest, pin: bool = False) -> None:
        """Load on the replica Serve routes this version to (pinned there, if asked)."""
        try:
            await self._handle(adapter).prewarm.remote(adapter, pin)
        except RayTaskError as e:
            if isinstance(e.cause, ValueError):
                raise ValueError(str(e.cause)) from None
            raise

    async def stats(self) -> dict:
        """Every live replica's stats under "replicas", and their sum at the top level (the
        shape /metrics reads from one engine)."""
        results = await self.replicas.broadcast("stats").results_async(
            timeout_s=STATS_TIMEOUT_S, return_exceptions=True)
        return _combine([r for r in results if isinstance(r, dict)])

    def is_alive(self) -> bool:
        return True  # Serve health-checks the replicas and replaces a dead one

    def shutdown(self) -> None:
        pass  # the replicas are Serve's: they stop with the application, not with the gateway


def _error_delta(previous: StreamDelta | None, index: int, prompt_tokens: int,
                 message: str) -> StreamDelta:
    if previous is None:
        return StreamDelta(request_id="", index=index, text="", token_ids=[], logprobs=[],
                           top_logprobs=[], finished=True, finish_reason="error",
                           error=message, error_kind="engine", prompt_tokens=prompt_tokens,
                           completion_tokens=0,
                           queue_seconds=None)
    return replace(previous, text="", token_ids=[], logprobs=[], top_logprobs=[],
                   finished=True, finish_reason="error", error=message, error_kind="engine")


def _combine(replica_stats: list[dict]) -> dict:
    """Counts add up, id lists concatenate, adapter load times keep the slowest replica's, a
    tenant's fair-share standing adds up over the replicas it has work on (each replica keeps
    its own counters: their sum is the weighted service the tenant is receiving), and so do its
    prefix-cache lookups (each replica has its own cache)."""
    combined: dict = {"replicas": replica_stats}
    for stats in replica_stats:
        for key, value in stats.items():
            if key == "fairness":
                tenants = combined.setdefault("fairness", {})
                for tenant, share in value.items():
                    into = tenants.setdefault(tenant, {"counter": 0.0, "sequences": 0,
                                                       "running": 0})
                    for field in ("counter", "sequences", "running"):
                        into[field] += share.get(field, 0)
                    into["weight"] = share["weight"]
            elif key == "prefix_cache":
                tenants = combined.setdefault("prefix_cache", {})
                for tenant, counts in value.items():
                    into = tenants.setdefault(tenant, {"queried_tokens": 0, "hit_tokens": 0})
                    into["queried_tokens"] += counts["queried_tokens"]
                    into["hit_tokens"] += counts["hit_tokens"]
                    into["hit_rate"] = into["hit_tokens"] / max(1, into["queried_tokens"])
            elif key.startswith("adapter_load_ms"):
                known = [v for v in (combined.get(key), value) if v is not None]
                combined[key] = max(known) if known else None
            elif isinstance(value, list):
                combined[key] = combined.get(key, []) + value
            elif isinstance(value, int | float):
                combined[key] = combined.get(key, 0) + value
    return combined


@serve.ingress()
class Gateway:
    """The ingress deployment. The app is built after the constructor (Serve calls
    `__serve_build_asgi_app__`), once the replicas have answered how long a context is."""

    async def __init__(self, replicas: DeploymentHandle, config: EngineConfig, home: str,
                       settings: ServerSettings):
        max_model_len = await replicas.max_model_len.remote()
        self.engine = RemoteEngine(replicas, EngineInfo(config, max_model_len))
        self.registry = Registry(Path(home))
        self.settings = settings

    def __serve_build_asgi_app__(self):
        return create_app(self.engine, self.registry, self.settings,
                          adapter_validator(self.engine.engine.config.model))

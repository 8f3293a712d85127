"""EngineReplica: one full loraplex engine on its own device, as a Ray Serve deployment.

The gateway tags every adapter request with the adapter version id as Serve's multiplexed model
id. A replica "loads" a version by reading it into its engine's host cache (and a free slot,
if there is one) through the engine's own loader; Serve then tells every router that this
replica holds that id, and routers send the version's next requests here. The multiplexed
cache holds as many ids as the host cache (`max_cpu_loras`), so what routers believe a replica
holds is what its engine holds.
"""

from collections import Counter
from collections.abc import AsyncIterator

from ray import serve

from loraplex.config import EngineConfig
from loraplex.engine.async_engine import AsyncEngine, StreamDelta
from loraplex.engine.sequence import AdapterRequest
from loraplex.sampling_params import SamplingParams


class EngineReplica:
    def __init__(self, config: EngineConfig):
        self.engine = AsyncEngine(config)
        # The Ray actor name of this replica: what `ray.get_actor` (and tests) look it up by.
        self.replica_id = serve.get_replica_context().replica_id.to_full_id_str()
        self.num_requests = 0
        self.loads: Counter[int] = Counter()  # version id -> times loaded on this replica
        # version id -> its request (path and artifact reader; versions are immutable)
        self._adapters: dict[int, AdapterRequest] = {}

        # Serve's multiplexed loader is built here, not with a decorator on the class, because
        # its capacity comes from this replica's config. Serve drops the least recently used id
        # beyond it and calls nothing on the AdapterRequest it held: the engine's host cache
        # evicts on its own, so unloading is a no-op and can never fail or run twice.
        async def load(model_id: str) -> AdapterRequest:
            adapter = self._adapters[int(model_id)]
            await self.engine.prewarm(adapter)  # awaits the loader thread; decoding goes on
            self.loads[adapter.adapter_id] += 1
            return adapter

        self._get_adapter = serve.multiplexed(max_num_models_per_replica=config.max_cpu_loras)(
            load)

    async def _ensure_loaded(self, adapter: AdapterRequest) -> None:
        self._adapters[adapter.adapter_id] = adapter
        await self._get_adapter(str(adapter.adapter_id))

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       adapter: AdapterRequest | None, fairness_key: str = "",
                       fairness_weight: float = 1.0) -> AsyncIterator[StreamDelta]:
        """Stream one request's deltas (the caller set multiplexed_model_id to the version id).
        A cancelled call (the gateway's client went away) aborts the request in the engine."""
        self.num_requests += 1
        if adapter is not None:
            await self._ensure_loaded(adapter)
        async for delta in self.engine.generate(prompt_ids, params, adapter,
                                                fairness_key=fairness_key,
                                                fairness_weight=fairness_weight):
            yield delta

    async def prewarm(self, adapter: AdapterRequest, pin: bool) -> None:
        await self._ensure_loaded(adapter)
        if pin:
            await self.engine.prewarm(adapter, pin=True)  # loaded already: this only pins

    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    async def stats(self) -> dict:
        return {"replica_id": self.replica_id, "requests": self.num_requests,
                "adapter_loads": sum(self.loads.values()),
                "loads_by_version": dict(self.loads), **await self.engine.stats()}

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising gets the replica replaced."""
        if not self.engine.is_alive():
            raise RuntimeError("the engine thread has stopped")

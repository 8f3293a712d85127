"""loraplex as a benchmarked System: the engine in process, and the real HTTP server.

Both follow one dispatch rule, shared with the peers: a request starts once its arrival time has
passed and fewer than `max_batch_size` requests are in flight. A closed loop (every arrival at 0)
is then `max_batch_size` clients that each send their next request when the last one finished;
an open loop (poisson / gamma arrivals) starts each request when it arrives, up to that many at
once. TTFT is counted from the arrival, so a request kept waiting is charged for it.
"""

from __future__ import annotations

import itertools
import json
import resource
import shutil
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from loraplex.bench.system import RequestRecord
from loraplex.bench.workload import BenchRequest
from loraplex.config import DTYPES, ConfigError, EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.sequence import AdapterRequest
from loraplex.lora.pages import DEFAULT_PAGE_RANK, pages_for
from loraplex.model.loader import read_config
from loraplex.sampling_params import SamplingParams

ENGINE_NAME = "loraplex"
INT8_NAME = "loraplex, int8 adapter weights"  # EngineConfig.lora_dtype="int8"
BASELINE_NAME = "loraplex, no adapters"  # the ceiling the report compares every system with
RESIDENT_NAME = "loraplex, every adapter in a slot"  # what slot misses and loads cost
RESIDENT_HOST_CACHE = 32  # its host cache: after pre-warming, every adapter serves from a slot
HTTP_NAME = "loraplex HTTP"
DEFAULT_RANK = 16
BLOCK_SIZE = EngineConfig.block_size
WARMUP_TOKENS = 2
HTTP_TIMEOUT_S = 600.0
TENANT = "bench"
ACTOR = "bench"
BASE_MODEL_NAME = "base"

_request_ids = itertools.count()


def adapter_rank(adapter_dir: Path) -> int:
    """The largest rank a PEFT adapter declares (its `r`, or a larger one in rank_pattern)."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return max([int(config.get("r", DEFAULT_RANK)),
                *map(int, (config.get("rank_pattern") or {}).values())])


def engine_config(model_dir: Path, adapters: list[Path], dtype: str, *, max_batch_size: int,
                  max_loras: int, max_cpu_loras: int | None, max_model_len: int | None,
                  kv_cache_bytes: int | None, lora_dtype: str = "auto",
                  max_lora_pages: int | None = None) -> EngineConfig:
    """The engine's settings for a benchmark: slots as wide as the widest adapter, every adapter
    in the host cache unless max_cpu_loras says otherwise, and (when max_model_len is known) a
    KV cache that holds max_batch_size full sequences, so nothing is preempted for lack of it."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if kv_cache_bytes is None and max_model_len is not None:
        mc = read_config(Path(model_dir))
        itemsize = DTYPES[dtype].itemsize
        block_bytes = 2 * mc.num_layers * BLOCK_SIZE * mc.num_kv_heads * mc.head_dim * itemsize
        blocks_per_seq = -(-max_model_len // BLOCK_SIZE) + 1
        kv_cache_bytes = block_bytes * blocks_per_seq * max_batch_size
    return EngineConfig(
        model=str(model_dir), dtype=dtype, max_loras=max_loras,
        max_cpu_loras=max_cpu_loras or max(max_loras, len(adapters)),
        max_lora_rank=max((adapter_rank(a) for a in adapters), default=DEFAULT_RANK),
        max_num_seqs=max_batch_size, max_model_len=max_model_len, kv_cache_bytes=kv_cache_bytes,
        lora_dtype=lora_dtype, max_lora_pages=max_lora_pages,
    )


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


class _Counters:
    """Engine and memory counters for one run: the change since `mark()`."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.start: dict = {}
        self.num_loads = 0
        self.num_activations = 0

    def mark(self) -> None:
        self.start = self.engine.stats()
        stats = self.engine.adapters.stats
        self.num_loads, self.num_activations = len(stats.load_seconds), len(stats.activate_seconds)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def delta(self) -> dict:
        now = self.engine.stats()
        stats = self.engine.adapters.stats
        loads = sorted(stats.load_seconds[self.num_loads:])
        activations = sorted(stats.activate_seconds[self.num_activations:])
        result = {key: now[key] - self.start.get(key, 0)
                  for key in ("slot_hits", "slot_misses", "host_misses", "preemptions", "steps")}
        result.update({
            "adapter_loads": len(loads),
            "adapter_load_ms_p50": 1e3 * loads[len(loads) // 2] if loads else None,
            "adapter_load_ms_max": 1e3 * loads[-1] if loads else None,
            "slot_activate_ms_p50": (1e3 * activations[len(activations) // 2]
                                     if activations else None),
            "slot_buffer_bytes": now["slot_buffer_bytes"],
            "adapters_in_slots": len(now["adapters_in_slots"]),  # at the run's end
            "slot_compactions": now["slot_compactions"] - self.start.get("slot_compactions", 0),
            **memory_stats(),
        })
        return result


def memory_stats() -> dict:
    """The process's peak resident memory (every system of the run shares the process) and, on
    CUDA, the peak device memory allocated since the last reset (at the run's start)."""
    stats = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        stats["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return stats


class LoraplexEngineSystem:
    """The engine in process, stepped from the calling thread: each token's time is the moment
    the step that made it returned. `use_adapters=False` runs the same requests on the base
    model: the no-adapter ceiling; `max_loras=None` gives every adapter a slot of its own (with
    a small host cache), so that no request ever waits for a load or a slot; `lora_dtype="int8"`
    keeps the adapters' weights in slots as int8."""

    def __init__(self, *, max_batch_size: int = 32, max_loras: int | None = 32,
                 max_cpu_loras: int | None = None, use_adapters: bool = True,
                 max_model_len: int | None = None, kv_cache_bytes: int | None = None,
                 lora_dtype: str = "auto"):
        self.name = (BASELINE_NAME if not use_adapters
                     else RESIDENT_NAME if max_loras is None
                     else INT8_NAME if lora_dtype == "int8" else ENGINE_NAME)
        self.lora_dtype = lora_dtype
        self.max_batch_size = max_batch_size
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.use_adapters = use_adapters
        self.max_model_len = max_model_len
        self.kv_cache_bytes = kv_cache_bytes
        self.engine: LLMEngine | None = None
        self.adapters: list[AdapterRequest] = []
        self.outputs: dict[int, list[int]] = {}  # request index -> generated ids (last run)

    def engine_config(self, model_dir: Path, used: list[Path], dtype: str) -> EngineConfig:
        max_loras, max_cpu_loras = self.max_loras, self.max_cpu_loras
        max_lora_pages = None
        if max_loras is None:
            max_loras, max_cpu_loras = max(1, len(used)), max_cpu_loras or RESIDENT_HOST_CACHE
            # Every adapter in pages of its own rank: the memory all of them take, not that of
            # as many slots of the largest rank (with a mix of ranks that would be far more).
            max_lora_pages = sum(pages_for(adapter_rank(a), DEFAULT_PAGE_RANK) for a in used)
        return engine_config(
            model_dir, used, dtype, max_batch_size=self.max_batch_size, max_loras=max_loras,
            max_cpu_loras=max_cpu_loras, max_model_len=self.max_model_len,
            kv_cache_bytes=self.kv_cache_bytes, lora_dtype=self.lora_dtype,
            max_lora_pages=max_lora_pages or None)

    def make_engine(self, config: EngineConfig) -> LLMEngine:
        return LLMEngine(config)

    def setup(self, model_dir: Path, adapters: list[Path], *, dtype: str) -> None:
        used = adapters if self.use_adapters else []
        self.engine = self.make_engine(self.engine_config(model_dir, used, dtype))
        self.adapters = [AdapterRequest(i, str(Path(p).resolve())) for i, p in enumerate(used)]
        for adapter in self.adapters:  # into the host cache, and into a slot while one is free
            self.engine.prewarm(adapter)
        self._counters = _Counters(self.engine)
        # A short untimed run takes the first-step costs (lazy imports, allocator growth).
        warmup = [BenchRequest(i, 0.0, i % len(used) if used and i else None, (1, 2, 3),
                               WARMUP_TOKENS) for i in range(min(4, self.max_batch_size))]
        self.run(warmup)

    def _adapter(self, request: BenchRequest) -> AdapterRequest | None:
        if not self.use_adapters or request.adapter is None:
            return None
        if not 0 <= request.adapter < len(self.adapters):
            raise ValueError(f"adapter {request.adapter} is not among the {len(self.adapters)} "
                             "set up")
        return self.adapters[request.adapter]

    def run(self, requests: list[BenchRequest]) -> list[RequestRecord]:
        engine = self.engine
        self._counters.mark()
        self.outputs = {}
        queue = deque(sorted(requests, key=lambda r: (r.arrival_s, r.index)))
        records: list[RequestRecord] = []
        live: dict[str, RequestRecord] = {}  # request id -> its record, while in flight
        start = time.perf_counter()
        while queue or live:
            now = time.perf_counter() - start
            while queue and len(live) < self.max_batch_size and queue[0].arrival_s <= now:
                request = queue.popleft()
                record = RequestRecord(request.index, request.adapter, len(request.prompt_ids),
                                       request.arrival_s, now)
                records.append(record)
                request_id = f"bench-{next(_request_ids)}"
                try:
                    engine.add_request(request_id, list(request.prompt_ids),
                                       greedy(request.max_tokens), self._adapter(request))
                except ValueError as e:  # refused (too long, unknown adapter): it fails alone
                    record.error = str(e)
                    continue
                live[request_id] = record
            if not live:  # idle until the next arrival
                time.sleep(max(0.0, queue[0].arrival_s - (time.perf_counter() - start)))
                continue
            outputs = engine.step()
            now = time.perf_counter() - start
            for out in outputs:
                record = live[out.request_id]
                new_tokens = len(out.token_ids) - record.output_tokens
                record.token_times_s.extend([now] * new_tokens)
                if out.finished:
                    record.error = out.error
                    self.outputs[record.index] = list(out.token_ids)
                    del live[out.request_id]
        return sorted(records, key=lambda r: r.index)

    def stats(self) -> dict:
        return self._counters.delta()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


class LoraplexHTTPSystem:
    """The real server on a loopback port: a temporary registry home with one tenant whose
    adapters are named adapter-0, adapter-1, ...; `max_batch_size` client threads stream
    POST /v1/completions with token-id prompts (httpx). Each request asks `logprobs: 0`, so every
    SSE chunk says how many tokens it carries; a token's time is when its chunk arrived.
    Client, server and engine share one Python process (and its GIL), as the thread runs them."""

    name = HTTP_NAME

    def __init__(self, *, max_batch_size: int = 32, max_loras: int = 32,
                 max_cpu_loras: int | None = None, max_model_len: int | None = None,
                 kv_cache_bytes: int | None = None):
        self.max_batch_size = max_batch_size
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.max_model_len = max_model_len
        self.kv_cache_bytes = kv_cache_bytes
        self._home: Path | None = None
        self._registry = None
        self._server = None
        self._client = None
        self._engine = None
        self.num_adapters = 0

    def setup(self, model_dir: Path, adapters: list[Path], *, dtype: str) -> None:
        import httpx

        from loraplex.engine.async_engine import AsyncEngine
        from loraplex.registry import Registry
        from loraplex.server.app import ServerSettings, create_app
        from loraplex.server.thread import ServerThread
        from loraplex.validation import adapter_validator
        from loraplex.vault.artifacts import ArtifactSealer

        config = engine_config(
            model_dir, adapters, dtype, max_batch_size=self.max_batch_size,
            max_loras=self.max_loras, max_cpu_loras=self.max_cpu_loras,
            max_model_len=self.max_model_len, kv_cache_bytes=self.kv_cache_bytes)
        self._home = Path(tempfile.mkdtemp(prefix="loraplex-bench-home-"))
        registry = self._registry = Registry(self._home)
        registry.create_tenant(TENANT, actor=ACTOR)
        registry.set_base_model_access(TENANT, True, actor=ACTOR)
        _, key = registry.create_key(TENANT, actor=ACTOR)
        validate = adapter_validator(str(model_dir))
        for i, path in enumerate(adapters):
            registry.push_version(TENANT, _model_name(i), path, actor=ACTOR, validate=validate,
                                  sealer=ArtifactSealer.for_home(self._home))
        self.num_adapters = len(adapters)
        self._engine = AsyncEngine(config)
        settings = ServerSettings(
            base_model_name=BASE_MODEL_NAME, max_tokens_cap=self._engine.engine.max_model_len,
            # A client may send its next request before the server has counted the last one out.
            max_concurrent_per_tenant=2 * self.max_batch_size + 8,
            max_in_flight=max(512, 2 * self.max_batch_size + 8))
        self._server = ServerThread(create_app(self._engine, registry, settings, validate))
        url = self._server.__enter__()
        self._client = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT_S,
            limits=httpx.Limits(max_connections=self.max_batch_size + 4,
                                max_keepalive_connections=self.max_batch_size + 4))
        self._counters = _Counters(self._engine.engine)
        # Untimed: every adapter once (disk -> host -> slot, as far as slots go) and the base.
        warmup = [BenchRequest(i, 0.0, i if i < len(adapters) else None, (1, 2, 3),
                               WARMUP_TOKENS) for i in range(len(adapters) + 1)]
        failed = [r.error for r in self.run(warmup) if r.error]
        if failed:
            raise RuntimeError(f"the server failed a warm-up request: {failed[0]}")

    def run(self, requests: list[BenchRequest]) -> list[RequestRecord]:
        self._counters.mark()
        pending = iter(sorted(requests, key=lambda r: (r.arrival_s, r.index)))
        lock = threading.Lock()
        start = time.perf_counter()

        def client() -> list[RequestRecord]:
            done = []
            while True:
                with lock:
                    request = next(pending, None)
                if request is None:
                    return done
                delay = request.arrival_s - (time.perf_counter() - start)
                if delay > 0:
                    time.sleep(delay)
                done.append(self._send(request, start))

        num_clients = max(1, min(self.max_batch_size, len(requests)))
        with ThreadPoolExecutor(num_clients, thread_name_prefix="bench-client") as pool:
            futures = [pool.submit(client) for _ in range(num_clients)]
            records = [record for future in futures for record in future.result()]
        return sorted(records, key=lambda r: r.index)

    def _send(self, request: BenchRequest, start: float) -> RequestRecord:
        import httpx

        record = RequestRecord(request.index, request.adapter, len(request.prompt_ids),
                               request.arrival_s, time.perf_counter() - start)
        if request.adapter is not None and not 0 <= request.adapter < self.num_adapters:
            record.error = f"adapter {request.adapter} is not among the {self.num_adapters} set up"
            return record
        body = {"model": BASE_MODEL_NAME if request.adapter is None else
                _model_name(request.adapter),
                "prompt": list(request.prompt_ids), "max_tokens": request.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "logprobs": 0}
        try:
            with self._client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    record.error = f"HTTP {response.status_code}: {response.text[:200]}"
                    return record
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        break
                    now = time.perf_counter() - start
                    chunk = json.loads(data)
                    if "error" in chunk:
                        record.error = chunk["error"].get("message", "error")
                        break
                    for choice in chunk["choices"]:
                        logprobs = choice.get("logprobs")
                        count = len(logprobs["tokens"]) if logprobs else int(bool(choice["text"]))
                        record.token_times_s.extend([now] * count)
        except httpx.HTTPError as e:
            record.error = f"{type(e).__name__}: {e}"
        return record

    def stats(self) -> dict:
        return self._counters.delta()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._server is not None:
            self._server.__exit__(None, None, None)  # the app's shutdown stops the engine
            self._server = None
        elif self._engine is not None:
            self._engine.shutdown()
        self._engine = None
        if self._registry is not None:
            self._registry.close()
            self._registry = None
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None


def _model_name(adapter: int) -> str:
    return f"adapter-{adapter}"

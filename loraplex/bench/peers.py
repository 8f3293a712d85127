"""The peer systems loraplex is benchmarked against, serving the same workload the way each of
them must: transformers without adapters and PEFT with static batches, PEFT switching adapters
per request, and llama.cpp serving one sequence at a time.

Every system generates greedily and exactly max_tokens tokens per request (EOS is just another
token) and keeps the ids in `outputs` (request index -> generated ids, last run), so a run can
check that the systems agree. The dispatch rule is loraplex_systems.py's, applied where each
system can take work: a request starts once it has arrived, and at most max_batch_size at once.

Static batching (the transformers systems): when the previous batch is done, the next batch
takes every request that has arrived (waiting for the next arrival if none has), up to
max_batch_size, in arrival order; rows are left-padded, and the batch decodes until its longest
row has all its tokens, finished rows riding along. A newcomer waits for the whole batch: that
is the cost the comparison is about.

torch, transformers, peft and llama_cpp are imported in setup(), so importing this module is
cheap. setup() ends with a short untimed warm-up run, as the loraplex systems' does.
"""

from __future__ import annotations

import gc
import inspect
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from loraplex.bench.system import RequestRecord
from loraplex.bench.workload import BenchRequest

# The run's dtype -> the GGUF encoding of the same precision.
GGUF_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
BASE_ADAPTER = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch
WARMUP_TOKENS = 2


def adapter_name(index: int) -> str:
    """The PEFT adapter name of the run's adapter `index`."""
    return f"a{index}"


def memory_stats() -> dict:
    """The process's peak resident memory (every system of the run shares the process) and, on
    CUDA, the peak device memory allocated since the run's start; the keys of
    loraplex_systems.memory_stats, without importing torch for a CPU-only peer."""
    stats = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        stats["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return stats


def _check_dtype(dtype: str) -> None:
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")


def _warmup_requests(num_adapters: int) -> list[BenchRequest]:
    """Two tiny requests, one on the base model and one on an adapter (when there are any)."""
    return [BenchRequest(i, 0.0, 0 if num_adapters and i else None, (1, 2, 3), WARMUP_TOKENS)
            for i in range(2)]


def _wait_until(t0: float, at_s: float) -> None:
    delay = at_s - (time.perf_counter() - t0)
    if delay > 0:
        time.sleep(delay)


def _record(request: BenchRequest, start_s: float) -> RequestRecord:
    return RequestRecord(request.index, request.adapter, len(request.prompt_ids),
                         request.arrival_s, start_s)


def _unknown_adapter(request: BenchRequest, num_adapters: int) -> str | None:
    if request.adapter is None or 0 <= request.adapter < num_adapters:
        return None
    return f"adapter {request.adapter} is not among the {num_adapters} set up"


class _StaticBatchSystem:
    """A transformers model (or a PeftModel around one) served in static batches by a greedy
    decode loop of its own, so that every token of every row is timed.

    device: "auto" (CUDA when there is one, as the engine's default), "cpu" or "cuda[:N]".
    """

    name = ""

    def __init__(self, *, max_batch_size: int = 32, device: str = "auto"):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.device = device
        self.model = None
        self.config = None  # the base model's transformers config
        self.num_adapters = 0
        self.outputs: dict[int, list[int]] = {}  # request index -> generated ids (last run)
        self._counters: dict[str, int] = {}
        self._cache_kwarg = "past_key_values"

    # --- set up -------------------------------------------------------------------------------

    def setup(self, model_dir: Path, adapters: list[Path], *, dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        _check_dtype(dtype)
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        base = base.to(self.device).eval()
        # transformers 5.x renames forward's past_key_values to cache (the old name warns).
        params = inspect.signature(base.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.config = base.config
        self.num_adapters = len(adapters)
        self.model = self._wrap(base, adapters).eval()
        self.run(_warmup_requests(self.num_adapters))

    def _wrap(self, base, adapters: list[Path]):
        """The model to serve, from the base model (transformers alone ignores the adapters)."""
        return base

    # --- run ----------------------------------------------------------------------------------

    def run(self, requests: list[BenchRequest]) -> list[RequestRecord]:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        self.outputs = {}
        self._counters = {"batches": 0, "rows": 0, "forward_passes": 0, "idle_row_steps": 0,
                          **self._extra_counters()}
        pending = sorted(requests, key=lambda r: (r.arrival_s, r.index))
        records: dict[int, RequestRecord] = {}
        t0 = time.perf_counter()
        with torch.inference_mode():
            while pending:
                _wait_until(t0, pending[0].arrival_s)
                now = time.perf_counter() - t0
                arrived = [r for r in pending[: self.max_batch_size] if r.arrival_s <= now]
                pending = pending[len(arrived):]
                batch = []
                for request in arrived:
                    record = records[request.index] = _record(request, now)
                    record.error = _unknown_adapter(request, self.num_adapters)
                    if record.error is None:
                        batch.append(request)
                if not batch:
                    continue
                batch_records = [records[r.index] for r in batch]
                try:
                    self._generate(batch, batch_records, t0)
                except Exception as error:  # noqa: BLE001 - the batch fails, the run goes on
                    for record in batch_records:
                        record.error = f"{type(error).__name__}: {error}"
        return [records[r.index] for r in requests]

    def _extra_counters(self) -> dict[str, int]:
        """A subclass's own counters, zeroed at the start of each run."""
        return {}

    def _forward_kwargs(self, batch: list[BenchRequest]) -> dict:
        """Extra keyword arguments for every forward of this batch (which adapter per row)."""
        return {}

    def _generate(self, batch: list[BenchRequest], records: list[RequestRecord],
                  t0: float) -> None:
        """Greedy decoding of one left-padded batch: each row's token times go to its record,
        its ids to self.outputs."""
        import torch
        from transformers import DynamicCache

        lengths = [len(r.prompt_ids) for r in batch]
        width = max(lengths)
        pad_id = 0  # any id: padded positions are masked out
        input_ids = torch.tensor([[pad_id] * (width - n) + list(r.prompt_ids)
                                  for r, n in zip(batch, lengths, strict=True)],
                                 device=self.device)  # [rows, width]
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths],
                            device=self.device)  # [rows, width so far]
        # As transformers' generate() does for left padding: each row's real tokens at 0, 1, ...
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [rows, width], then [rows, 1]
        cache = DynamicCache(config=self.config)  # filled in place by each forward
        extra = {**self._forward_kwargs(batch), self._cache_kwarg: cache}
        wanted = [r.max_tokens for r in batch]
        generated: list[list[int]] = [[] for _ in batch]
        steps = max(wanted)
        self._counters["batches"] += 1
        self._counters["rows"] += len(batch)
        for step in range(steps):
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, logits_to_keep=1, **extra)
            self._counters["forward_passes"] += 1
            next_ids = out.logits[:, -1, :].argmax(dim=-1)  # [rows]
            ids = next_ids.tolist()  # waits for the device
            now = time.perf_counter() - t0
            for row, token in enumerate(ids):
                if len(generated[row]) < wanted[row]:
                    generated[row].append(token)
                    records[row].token_times_s.append(now)
                else:
                    self._counters["idle_row_steps"] += 1
            if step + 1 == steps:
                break
            input_ids = next_ids[:, None]
            mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=1)
            positions = positions[:, -1:] + 1
        for request, ids in zip(batch, generated, strict=True):
            self.outputs[request.index] = ids

    # --- report, close ------------------------------------------------------------------------

    def stats(self) -> dict:
        counters = dict(self._counters)
        batches = counters["batches"]
        counters["mean_batch_size"] = counters["rows"] / batches if batches else 0.0
        counters["adapters_loaded"] = self.num_adapters if self._uses_adapters() else 0
        return {**counters, "device": self.device, **memory_stats()}

    def _uses_adapters(self) -> bool:
        return False

    def close(self) -> None:
        self.model = None
        self.config = None
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


class TransformersSystem(_StaticBatchSystem):
    """The base model alone in static batches: serving without adapters at all (a request that
    names an adapter is answered by the base model)."""

    name = "transformers, no adapters"


class _PeftSystem(_StaticBatchSystem):
    """Every adapter loaded once into one PeftModel, as a0, a1, ..."""

    def _wrap(self, base, adapters: list[Path]):
        from peft import PeftModel

        if not adapters:
            return base
        model = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name=adapter_name(0))
        for i, path in enumerate(adapters[1:], start=1):
            model.load_adapter(str(path), adapter_name=adapter_name(i))
        return model

    def _uses_adapters(self) -> bool:
        return True


class PeftMixedSystem(_PeftSystem):
    """Static batches that mix adapters, each row naming its own: PEFT's mixed-adapter batch
    inference (`adapter_names=[...]` in the forward, "__base__" for the base model)."""

    name = "PEFT mixed batch"

    def _extra_counters(self) -> dict[str, int]:
        return {"distinct_adapters": 0}  # summed over batches

    def _forward_kwargs(self, batch: list[BenchRequest]) -> dict:
        if not self.num_adapters:  # a plain model: every request is a base request
            return {}
        names = [BASE_ADAPTER if r.adapter is None else adapter_name(r.adapter) for r in batch]
        self._counters["distinct_adapters"] += len(set(names) - {BASE_ADAPTER})
        return {"adapter_names": names}

    def stats(self) -> dict:
        stats = super().stats()
        batches = stats["batches"]
        stats["mean_distinct_adapters_per_batch"] = (
            stats.pop("distinct_adapters") / batches if batches else 0.0)
        return stats


class PeftSwitchSystem(_PeftSystem):
    """One request at a time, `set_adapter` before each (the base model's requests inside
    `disable_adapter()`): swapping the active adapter per request. max_batch_size is accepted
    for a uniform constructor; a batch is always one request."""

    name = "PEFT set_adapter"

    def __init__(self, *, max_batch_size: int = 32, device: str = "auto"):
        super().__init__(max_batch_size=max_batch_size, device=device)
        self.max_batch_size = 1
        self._active: str | None = None

    def _extra_counters(self) -> dict[str, int]:
        return {"adapter_switches": 0}  # requests that found another adapter active

    def _generate(self, batch, records, t0) -> None:
        (request,) = batch
        use_base = request.adapter is None or not self.num_adapters
        name = BASE_ADAPTER if use_base else adapter_name(request.adapter)
        if name != self._active:
            self._counters["adapter_switches"] += 1
            self._active = name
        if not self.num_adapters:
            super()._generate(batch, records, t0)
        elif use_base:
            with self.model.disable_adapter():
                super()._generate(batch, records, t0)
        else:
            self.model.set_adapter(name, inference_mode=True)
            super()._generate(batch, records, t0)


class LlamaCppSystem:
    """llama.cpp through llama-cpp-python: the base model and every adapter exported by
    loraplex's own GGUF exporter at the run's precision, every adapter loaded once, one request
    at a time (the binding runs one sequence), the context's adapter switched per request with
    llama_set_adapters_lora (an empty list for the base model), the KV state reset between
    requests, greedy over the last position's logits (EOS ignored).

    n_threads: ggml threads (default: torch's thread count); n_ctx: context size (0: the
    model's trained length); f32_kv_cache: an f32 KV cache instead of llama.cpp's default f16,
    for checking tokens against PEFT exactly rather than for benchmarking. All layers go to the
    GPU when this build of llama.cpp can offload. max_batch_size is accepted for a uniform
    constructor and not used.
    """

    name = "llama.cpp"

    def __init__(self, *, max_batch_size: int = 32, n_threads: int | None = None,
                 n_ctx: int = 0, n_batch: int = 512, f32_kv_cache: bool = False):
        self.max_batch_size = max_batch_size
        self.n_threads = n_threads
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.f32_kv_cache = f32_kv_cache
        self.llm = None
        self.outputs: dict[int, list[int]] = {}  # request index -> generated ids (last run)
        self._loras: list = []  # one llama_adapter_lora_p per run adapter
        self._active: int | None = None  # the adapter set on the context
        self._tmp: Path | None = None
        self._setup_stats: dict = {}
        self._counters: dict[str, int] = {}

    def setup(self, model_dir: Path, adapters: list[Path], *, dtype: str) -> None:
        import llama_cpp
        import torch

        from loraplex.export.gguf import export_adapter, export_merged

        _check_dtype(dtype)
        gguf_dtype = GGUF_DTYPES[dtype]
        self._tmp = Path(tempfile.mkdtemp(prefix="loraplex-llama-cpp-"))
        started = time.perf_counter()
        base = export_merged(model_dir, self._tmp / "base.gguf", gguf_dtype, None, name="base",
                             force=True)
        files = [export_adapter(model_dir, path, self._tmp / f"{adapter_name(i)}.gguf",
                                gguf_dtype, name=adapter_name(i), force=True,
                                base_gguf=f"./{base.gguf_path.name}")
                 for i, path in enumerate(adapters)]
        self.n_threads = self.n_threads or torch.get_num_threads()
        offload = bool(llama_cpp.llama_supports_gpu_offload())
        kv = {}
        if self.f32_kv_cache:
            kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
        self.llm = llama_cpp.Llama(
            model_path=str(base.gguf_path), n_ctx=self.n_ctx, n_batch=self.n_batch,
            n_threads=self.n_threads, n_threads_batch=self.n_threads,
            n_gpu_layers=-1 if offload else 0, verbose=False, **kv)
        for f in files:
            lora = llama_cpp.llama_adapter_lora_init(self.llm.model, str(f.gguf_path).encode())
            if not lora:
                raise RuntimeError(f"llama.cpp could not load the adapter {f.gguf_path}")
            self._loras.append(lora)
        self._active = None
        self._setup_stats = {
            "export_and_load_s": time.perf_counter() - started,
            "gguf_bytes": base.num_bytes + sum(f.num_bytes for f in files),
            "gpu_offload": offload,
        }
        self.run(_warmup_requests(len(self._loras)))

    def _switch(self, adapter: int | None) -> None:
        """Make `adapter` (None: none) the context's only LoRA, at scale 1: the exported alpha
        equals the rank, so llama.cpp's alpha / rank is 1 too."""
        import ctypes

        import llama_cpp

        if adapter == self._active:
            return
        if adapter is None:
            status = llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            loras = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._loras[adapter])
            scales = (ctypes.c_float * 1)(1.0)
            status = llama_cpp.llama_set_adapters_lora(self.llm.ctx, loras, 1, scales)
        if status != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed with {status}")
        self._active = adapter
        self._counters["adapter_switches"] += 1

    def run(self, requests: list[BenchRequest]) -> list[RequestRecord]:
        self.outputs = {}
        self._counters = {"requests": 0, "adapter_switches": 0}
        n_ctx = self.llm.n_ctx()
        records: dict[int, RequestRecord] = {}
        t0 = time.perf_counter()
        for request in sorted(requests, key=lambda r: (r.arrival_s, r.index)):
            _wait_until(t0, request.arrival_s)
            record = records[request.index] = _record(request, time.perf_counter() - t0)
            self._counters["requests"] += 1
            try:
                if error := _unknown_adapter(request, len(self._loras)):
                    raise ValueError(error)
                if len(request.prompt_ids) + request.max_tokens > n_ctx:
                    raise ValueError(f"prompt + max_tokens is more than n_ctx {n_ctx}")
                self._switch(request.adapter)
                self.outputs[request.index] = self._generate(request, record, t0)
            except Exception as error:  # noqa: BLE001 - the request fails, the run goes on
                record.error = f"{type(error).__name__}: {error}"
        return [records[r.index] for r in requests]

    def _generate(self, request: BenchRequest, record: RequestRecord, t0: float) -> list[int]:
        import llama_cpp
        import numpy as np

        llm = self.llm
        n_vocab = llm.n_vocab()
        llm.reset()  # the next eval drops every cached position
        ids: list[int] = []
        feed = list(request.prompt_ids)
        for step in range(request.max_tokens):
            llm.eval(feed)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                           shape=(n_vocab,))
            ids.append(int(logits.argmax()))
            record.token_times_s.append(time.perf_counter() - t0)
            if step + 1 < request.max_tokens:
                feed = ids[-1:]
        return ids

    def stats(self) -> dict:
        return {**self._counters, **self._setup_stats, "adapters_loaded": len(self._loras),
                "n_threads": self.n_threads, "n_ctx": self.llm.n_ctx() if self.llm else None,
                "f32_kv_cache": self.f32_kv_cache, **memory_stats()}

    def close(self) -> None:
        import llama_cpp

        if self.llm is not None:
            if self._active is not None:
                llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
            for lora in self._loras:  # before the model, which would free them too
                llama_cpp.llama_adapter_lora_free(lora)
            self._loras = []
            self.llm.close()
            self.llm = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        gc.collect()

"""Engine micro-benchmark: cold adapter load (disk -> host -> slot) and decode tokens/s by
concurrency and number of distinct adapters.

    python -m loraplex.bench.engine [--dtype float32] [--lora-dtype auto] [--repeats 3]
        [--json results.json]

Decode configurations run `repeats` times, interleaved round-robin so that drift on the machine
affects all of them alike, and the median is shown. The output is markdown for BENCHMARKS.md.
Adapters are written under $TMPDIR (set it to benchmark another disk) and deleted afterwards.
"""

import argparse
import itertools
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from loraplex.bench.adapters import private_adapter_cache, write_random_adapter
from loraplex.config import DTYPES, LORA_DTYPES, EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.sequence import AdapterRequest
from loraplex.lora.adapter import CONFIG_FILE, WEIGHTS_FILE, load_adapter
from loraplex.lora.packed import cache_file
from loraplex.sampling_params import SamplingParams

RANK = 16
MAX_LORAS = 32
MAX_NUM_SEQS = 64
MAX_MODEL_LEN = 256
KV_CACHE_BYTES = 1 << 30
LOAD_SAMPLES = 50
QUICK_LOAD_SAMPLES = 10
TARGET_LOAD_MS = 5.0  # p50 of a cold disk -> slot load (from the adapter cache, page cache cold)
PROMPTS = [  # 8 to 16 tokens each, so a run is almost all decode
    "The history of the city of Paris begins",
    "Write a short poem about the sea and the wind at night",
    "Explain in simple words how a bicycle stays upright while it is moving",
    "Here are three facts about the planet Mars that most people do not know",
]

_request_ids = itertools.count()


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _sync(engine: LLMEngine) -> None:
    # Slot copies on a GPU are asynchronous; time them to completion.
    if engine.config.torch_device.type == "cuda":
        torch.cuda.synchronize()


def _evict_from_page_cache(path: Path) -> None:
    """Flush the file to disk and ask the kernel to drop its cached pages (best effort: tmpfs
    ignores it, and a VM's host may still cache the virtual disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _percentiles(values: list[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    return (1e3 * statistics.median(values),
            1e3 * statistics.quantiles(values, n=100, method="inclusive")[98])


LOAD_PASSES = {
    "first_load": "first load (PEFT files never read, evicted from page cache): parse, check, "
                  "keep in the adapter cache",
    "cached": "cold load from the adapter cache (entries evicted from page cache)",
    "cached_warm": "cold load from the adapter cache (page cache warm)",
}


def bench_load(engine: LLMEngine, paths: list[Path]) -> dict[str, dict[str, list[float]]]:
    """Seconds per adapter, disk -> host (`load_adapter`, with the engine's adapter cache) and
    host -> slot (`slots.activate`), for each pass of LOAD_PASSES in order."""
    config = engine.model.config
    slots = engine.adapters.slots
    cache_dir, dtype = engine.adapters.cache_dir, engine.config.torch_dtype
    passes = {}
    for name in LOAD_PASSES:
        if name == "cached" and cache_dir is not None:
            for path in paths:
                sources = [path / CONFIG_FILE, path / WEIGHTS_FILE]
                _evict_from_page_cache(cache_file(cache_dir, sources, dtype))
        disk, slot = [], []
        for i, path in enumerate(paths):
            start = time.perf_counter()
            weights = load_adapter(path, num_layers=config.num_layers,
                                   module_shapes=config.module_shapes(), max_rank=RANK,
                                   dtype=dtype, cache_dir=cache_dir)
            loaded = time.perf_counter()
            slots.activate(i % MAX_LORAS, weights)
            _sync(engine)
            disk.append(loaded - start)
            slot.append(time.perf_counter() - loaded)
        passes[name] = {"disk_to_host": disk, "host_to_slot": slot,
                        "total": [d + s for d, s in zip(disk, slot, strict=True)]}
    return passes


def run_decode(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams,
               adapters: list[AdapterRequest | None]) -> float:
    """Generated tokens per second for one request per entry of `adapters`, all at once."""
    for i, adapter in enumerate(adapters):
        engine.add_request(f"bench-{next(_request_ids)}", prompts[i % len(prompts)], params,
                           adapter)
    tokens = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                if out.error:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                tokens += len(out.token_ids)
    return tokens / (time.perf_counter() - start)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--lora-dtype", default="auto", choices=LORA_DTYPES,
                        help="adapter weights in slots (int8: quantized on activation)")
    parser.add_argument("--repeats", type=int, help="runs per decode configuration (default 3)")
    parser.add_argument("--max-tokens", type=int,
                        help=f"tokens generated per request (default 64, at most "
                             f"{MAX_MODEL_LEN - 16})")
    parser.add_argument("--concurrency", type=_int_list,
                        help="comma-separated concurrent request counts (default 1,8,32,64)")
    parser.add_argument("--adapters", type=_int_list,
                        help="comma-separated distinct adapter counts (default 0,1,8,32); "
                             "a count above the requests is capped at the requests")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_LOAD_SAMPLES} adapter loads, 8 tokens, 1 repeat, "
                             "concurrency 1,8, adapters 0,1,8 (explicit options still win)")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.max_tokens is None:
        args.max_tokens = 8 if args.quick else 64
    args.concurrency = args.concurrency or ([1, 8] if args.quick else [1, 8, 32, 64])
    args.adapters = args.adapters or ([0, 1, 8] if args.quick else [0, 1, 8, 32])
    args.load_samples = QUICK_LOAD_SAMPLES if args.quick else LOAD_SAMPLES
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    # Prompts are at most 16 tokens; the rest of max_model_len is for generation.
    if not 1 <= args.max_tokens <= MAX_MODEL_LEN - 16:
        parser.error(f"--max-tokens must be in [1, {MAX_MODEL_LEN - 16}]")
    if not all(1 <= c <= MAX_NUM_SEQS for c in args.concurrency):
        parser.error(f"--concurrency values must be in [1, {MAX_NUM_SEQS}] (max_num_seqs)")
    # More adapters than slots would swap during decode, which is not the steady state measured.
    if not all(0 <= a <= MAX_LORAS for a in args.adapters):
        parser.error(f"--adapters values must be in [0, {MAX_LORAS}] (max_loras)")
    return args


def measure(args: argparse.Namespace, engine: LLMEngine, tmp: Path) -> dict:
    """Write the adapters, time their loads, then every decode configuration."""
    # Adapter 0 is a warm-up load (lazy imports, allocator growth), never timed.
    count = 1 + max(args.load_samples, *args.adapters)
    paths = [write_random_adapter(tmp / f"a{i}", engine.model.config, RANK, seed=i)
             for i in range(count)]
    for path in paths:
        _evict_from_page_cache(path / WEIGHTS_FILE)
    bench_load(engine, paths[:1])
    load = bench_load(engine, paths[1:1 + args.load_samples])

    # The manager still thinks every slot is empty, so prewarm re-activates over the copies
    # bench_load made; afterwards every adapter sits in its own slot for the whole run.
    adapters = [AdapterRequest(i, str(path))
                for i, path in enumerate(paths[1:1 + max(args.adapters)])]
    for adapter in adapters:
        engine.prewarm(adapter)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    configs: dict[tuple[int, int], list[int]] = {}  # (requests, distinct) -> counts asked for
    for c in args.concurrency:
        for a in args.adapters:
            configs.setdefault((c, min(a, c)), []).append(a)

    def assign(c: int, a: int) -> list[AdapterRequest | None]:
        return [adapters[i % a] if a else None for i in range(c)]

    # One short untimed run of the largest configuration warms up every code path.
    run_decode(engine, prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
               assign(*max(configs)))
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    activations = engine.adapters.stats.slot_misses
    decode: dict[tuple[int, int], list[float]] = {key: [] for key in configs}
    for _ in range(args.repeats):
        for key in configs:
            decode[key].append(run_decode(engine, prompts, params, assign(*key)))
    rows = []
    for (c, a), asked in configs.items():
        median = statistics.median(decode[(c, a)])
        base = decode.get((c, 0))
        rows.append({"requests": c, "distinct_adapters": a, "asked_adapters": asked,
                     "tokens_per_second": decode[(c, a)], "median": median,
                     "ratio_vs_no_adapter": median / statistics.median(base) if base else None})
    return {
        "adapter_bytes": (paths[0] / WEIGHTS_FILE).stat().st_size,
        "prompt_tokens": sorted({len(p) for p in prompts}),
        "load_seconds": load,
        "decode": rows,
        "timed_slot_activations": engine.adapters.stats.slot_misses - activations,
    }


def report(args: argparse.Namespace, meta: dict, results: dict) -> None:
    print(f"`{meta['command']}`\n")
    print(f"torch {meta['torch']}, {meta['threads']} threads, device {meta['device']}, "
          f"dtype {args.dtype}, adapter weights {args.lora_dtype}, model {args.model}\n")
    print(f"### Cold adapter load: rank {RANK}, all seven target modules "
          f"({results['adapter_bytes'] / 1e6:.1f} MB float32 safetensors), "
          f"{args.load_samples} adapters\n")
    print("| pass | disk -> host p50 / p99 ms | host -> slot p50 / p99 ms | total p50 / p99 ms |")
    print("|---|---|---|---|")
    load = results["load_seconds"]
    for name, label in LOAD_PASSES.items():
        cells = ["{:.2f} / {:.2f}".format(*_percentiles(load[name][part]))
                 for part in ("disk_to_host", "host_to_slot", "total")]
        print(f"| {label} | {' | '.join(cells)} |")
    cold_p50 = _percentiles(load["cached"]["total"])[0]
    print(f"\nTarget cold load total p50 <= {TARGET_LOAD_MS:g} ms: "
          f"{'met' if cold_p50 <= TARGET_LOAD_MS else 'NOT met'} ({cold_p50:.2f} ms, from the "
          "adapter cache with its entries evicted from the page cache). Files were fsynced and "
          "dropped from the page cache (posix_fadvise DONTNEED) before the passes that say so; "
          "tmpfs ignores that, and a VM's host may still cache the disk.\n")
    lengths = results["prompt_tokens"]
    print(f"### Decode: {args.max_tokens} generated tokens per request (ignore_eos, greedy), "
          f"prompts {lengths[0]}-{lengths[-1]} tokens, adapters round-robin over requests, "
          f"median of {args.repeats}\n")
    print("| requests | distinct adapters | tokens/s | vs 0 adapters |")
    print("|---|---|---|---|")
    for row in results["decode"]:
        a, asked = row["distinct_adapters"], row["asked_adapters"]
        label = str(a) if asked == [a] else f"{a} (asked {', '.join(map(str, asked))})"
        ratio = row["ratio_vs_no_adapter"]
        print(f"| {row['requests']} | {label} | {row['median']:.1f} | "
              f"{'-' if ratio is None else f'{ratio:.2f}x'} |")
    print("\nDistinct adapters are capped at the number of requests. Slot activations during the "
          f"timed decode runs: {results['timed_slot_activations']} (0 = steady state).")


def main() -> None:
    args = _parse_args()
    with (tempfile.TemporaryDirectory(prefix="loraplex-bench-") as tmp,
          private_adapter_cache(Path(tmp) / "adapter-cache")):
        engine = LLMEngine(EngineConfig(
            model=args.model, dtype=args.dtype, max_loras=MAX_LORAS, max_cpu_loras=2 * MAX_LORAS,
            max_num_seqs=MAX_NUM_SEQS, max_lora_rank=RANK, max_model_len=MAX_MODEL_LEN,
            kv_cache_bytes=KV_CACHE_BYTES, lora_dtype=args.lora_dtype,
        ))
        try:
            results = measure(args, engine, Path(tmp))
        finally:
            engine.shutdown()
    meta = {
        "command": " ".join(["python -m loraplex.bench.engine", *map(shlex.quote, sys.argv[1:])]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(engine.config.torch_device),
        "dtype": args.dtype,
        "lora_dtype": args.lora_dtype,
        "model": args.model,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "target_load_ms": TARGET_LOAD_MS,
    }
    report(args, meta, results)
    if args.json:
        args.json.write_text(json.dumps({**meta, **results}, indent=2))


if __name__ == "__main__":
    main()

"""Run several systems on the same workload side by side: set each up once, then, repeat after
repeat, run them one after another in a rotating order (drift on the machine then touches them
all alike) and keep the median of each figure.

A sweep over the number of adapters reuses the same systems: the largest number of adapters is
written and set up once, and a workload with k adapters uses the first k.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import SafetensorError

from loraplex.bench.adapters import private_adapter_cache
from loraplex.bench.isolated import IsolatedSystem
from loraplex.bench.loraplex_systems import (
    LoraplexEngineSystem,
    LoraplexHTTPSystem,
)
from loraplex.bench.metrics import summarize
from loraplex.bench.rank_mix import PagedSlotsSystem, RankMaxSlotsSystem
from loraplex.bench.system import System
from loraplex.bench.workload import WorkloadSpec, make_workload
from loraplex.lora.modules import TARGET_MODULES

BENCH_EXTRA = "pip install 'loraplex[bench]'"


class BenchError(ValueError):
    """A benchmark that cannot run as asked; the message says why."""


@dataclass(frozen=True)
class SystemOptions:
    """What every system is built with, from the workload."""

    max_batch_size: int  # the workload's concurrency: requests in flight at most
    max_model_len: int  # the longest prompt + output of the workload
    max_cpu_loras: int | None = None  # loraplex's host cache; None: every adapter


def _peer(class_name: str) -> Callable[[SystemOptions], System]:
    def make(options: SystemOptions) -> System:
        try:
            from loraplex.bench import peers
        except ImportError as e:
            raise BenchError(f"the peer systems are not available ({e}); install the benchmark "
                             f"extras: {BENCH_EXTRA}") from None
        cls = getattr(peers, class_name, None)
        if cls is None:
            raise BenchError(f"loraplex.bench.peers has no {class_name}")
        return cls(max_batch_size=options.max_batch_size)

    return make


SYSTEMS: dict[str, Callable[[SystemOptions], System]] = {
    "loraplex": lambda o: LoraplexEngineSystem(max_batch_size=o.max_batch_size,
                                               max_model_len=o.max_model_len,
                                               max_cpu_loras=o.max_cpu_loras),
    "loraplex-int8": lambda o: LoraplexEngineSystem(max_batch_size=o.max_batch_size,
                                                    max_model_len=o.max_model_len,
                                                    max_cpu_loras=o.max_cpu_loras,
                                                    lora_dtype="int8"),
    "loraplex-resident": lambda o: LoraplexEngineSystem(max_batch_size=o.max_batch_size,
                                                        max_model_len=o.max_model_len,
                                                        max_loras=None),
    "loraplex-rank-max": lambda o: RankMaxSlotsSystem(max_batch_size=o.max_batch_size,
                                                      max_model_len=o.max_model_len,
                                                      max_cpu_loras=o.max_cpu_loras),
    "loraplex-paged": lambda o: PagedSlotsSystem(max_batch_size=o.max_batch_size,
                                                 max_model_len=o.max_model_len,
                                                 max_cpu_loras=o.max_cpu_loras),
    "loraplex-base": lambda o: LoraplexEngineSystem(max_batch_size=o.max_batch_size,
                                                    max_model_len=o.max_model_len,
                                                    use_adapters=False),
    "loraplex-http": lambda o: LoraplexHTTPSystem(max_batch_size=o.max_batch_size,
                                                  max_model_len=o.max_model_len,
                                                  max_cpu_loras=o.max_cpu_loras),
    "transformers": _peer("TransformersSystem"),
    "peft-mixed": _peer("PeftMixedSystem"),
    "peft-switch": _peer("PeftSwitchSystem"),
    "llama.cpp": _peer("LlamaCppSystem"),
}


def check_systems(names: Sequence[str]) -> None:
    if not names:
        raise BenchError("no systems given")
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise BenchError(f"unknown system {unknown[0]!r}; known: {', '.join(SYSTEMS)}")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise BenchError(f"system {repeated[0]!r} is given twice")


def ordinary_token_ids(model_dir: Path, model_vocab_size: int) -> list[int]:
    """Token ids a prompt may be drawn from: the tokenizer's own, less its added (special)
    tokens and any id past the model's embedding rows."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    special = set(tokenizer.get_added_tokens_decoder())
    size = min(tokenizer.get_vocab_size(with_added_tokens=True), model_vocab_size)
    return [i for i in range(size) if i not in special]


def machine_info(dtype: str) -> dict:
    import torch

    info = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "dtype": dtype,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _medians(rows: list[dict]) -> dict:
    """Per key, the median over repeats of the numbers (None where no repeat has one)."""
    keys = dict.fromkeys(k for row in rows for k in row)
    medians = {}
    for key in keys:
        values = [row.get(key) for row in rows]
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        medians[key] = statistics.median(numbers) if numbers else None
    return medians


def run_benchmark(
    model: str,
    systems: Sequence[str],
    specs: WorkloadSpec | Sequence[WorkloadSpec],
    *,
    repeats: int = 3,
    dtype: str = "float32",
    out_dir: Path | None = None,
    rank: int | Sequence[int] = 16,
    targets: Sequence[str] = TARGET_MODULES,
    log: Callable[[str], None] = lambda line: None,
    isolate: bool = False,
    max_cpu_loras: int | None = None,
) -> dict:
    """Run every system on every workload `repeats` times; returns the results (see report.py
    for their shape) and, when `out_dir` is given, writes the report files there. With
    `isolate`, each system runs in a process of its own (see isolated.py). `max_cpu_loras`
    bounds loraplex's host cache (default: every adapter stays loaded). `rank`: the adapters',
    or a mix: adapter i has rank[i % len(rank)], so every popularity has every rank."""
    from loraplex.model.loader import read_config
    from loraplex.model.pull import resolve_model

    specs = [specs] if isinstance(specs, WorkloadSpec) else list(specs)
    check_systems(systems)
    if not specs:
        raise BenchError("no workload given")
    if repeats < 1:
        raise BenchError(f"repeats must be at least 1, got {repeats}")
    ranks = [rank] if isinstance(rank, int) else list(rank)
    if not ranks or min(ranks) < 1:
        raise BenchError(f"rank must be at least 1, got {rank}")
    if max_cpu_loras is not None and max_cpu_loras < 1:
        raise BenchError(f"max_cpu_loras must be at least 1, got {max_cpu_loras}")
    if len({s.concurrency for s in specs}) > 1:
        raise BenchError("every workload of one run must have the same concurrency")
    if out_dir is not None:
        from loraplex.bench.report import can_plot

        if not can_plot():
            log(f"note: matplotlib is not installed, so no plots will be drawn ({BENCH_EXTRA})")
    model_dir = resolve_model(model)
    config = read_config(model_dir)
    vocab = ordinary_token_ids(model_dir, config.vocab_size)
    workloads = [make_workload(spec, vocab) for spec in specs]
    options = SystemOptions(
        max_batch_size=specs[0].concurrency,
        max_model_len=max(s.prompt_len[1] + s.output_len[1] for s in specs),
        max_cpu_loras=max_cpu_loras)
    num_adapters = max(s.num_adapters for s in specs)
    results = {
        "model": model, "dtype": dtype, "repeats": repeats,
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "targets": list(targets), "machine": machine_info(dtype), "isolated": isolate,
        "max_cpu_loras": max_cpu_loras,
        "systems": [],
        "points": [{"spec": asdict(spec), "systems": {}} for spec in specs],
    }
    built: list[tuple[str, System]] = []
    with (tempfile.TemporaryDirectory(prefix="loraplex-bench-") as tmp,
          private_adapter_cache(Path(tmp) / "adapter-cache")):
        from loraplex.bench.adapters import write_random_adapter
        from loraplex.config import DTYPES

        # Stored in the run's precision (what a trained adapter would be saved in): 1,000
        # rank-16 all-module adapters are 9.8 GB in bf16, twice that in float32.
        try:
            adapters = [write_random_adapter(Path(tmp) / f"adapter-{i}", config,
                                             ranks[i % len(ranks)],
                                             tuple(targets), seed=specs[0].seed * 100_003 + i,
                                             dtype=DTYPES[dtype])
                        for i in range(num_adapters)]
        except (OSError, SafetensorError) as e:  # e.g. a full disk: 1,000 adapters are GBs
            raise BenchError(f"cannot write the benchmark's {num_adapters} adapters under "
                             f"{tmp} ({e}); free some space or point TMPDIR elsewhere") from None
        try:
            for key in systems:
                start = time.perf_counter()
                try:
                    system = IsolatedSystem(key, options) if isolate else SYSTEMS[key](options)
                    built.append((key, system))
                    log(f"setting up {system.name}")
                    system.setup(model_dir, adapters, dtype=dtype)
                except BenchError:
                    raise
                except ImportError as e:
                    raise BenchError(f"{key}: {e}; install the benchmark extras: "
                                     f"{BENCH_EXTRA}") from None
                except (ValueError, OSError, RuntimeError) as e:
                    raise BenchError(f"{key}: setup failed: {e}") from None
                results["systems"].append({"key": key, "name": system.name,
                                           "setup_s": time.perf_counter() - start})
            for point, requests in zip(results["points"], workloads, strict=True):
                _run_point(point, requests, built, repeats, log)
        finally:
            for _, system in built:
                system.close()
    if out_dir is not None:
        from loraplex.bench.report import write_report

        results["files"] = [str(p) for p in write_report(results, Path(out_dir))]
    return results


def _run_point(point: dict, requests, built: list[tuple[str, System]], repeats: int,
               log: Callable[[str], None]) -> None:
    spec = point["spec"]
    runs: dict[str, list[dict]] = {system.name: [] for _, system in built}
    ttft: dict[str, list[float]] = {system.name: [] for _, system in built}
    for repeat in range(repeats):
        shift = repeat % len(built)
        for _, system in built[shift:] + built[:shift]:
            start = time.perf_counter()
            records = system.run(requests)
            wall_s = time.perf_counter() - start
            summary = summarize(records, wall_s)
            runs[system.name].append({**summary, **system.stats()})
            ttft[system.name] += [1e3 * r.ttft_s for r in records
                                  if r.error is None and r.ttft_s is not None]
            first_error = next((r.error for r in records if r.error), None)
            log(f"{spec['num_adapters']} adapters, repeat {repeat + 1}/{repeats}: "
                f"{system.name}: {summary['output_tokens_per_s']:.1f} output tokens/s, "
                f"{summary['errors']} errors" + (f" (first: {first_error})" if first_error
                                                 else ""))
    for name, rows in runs.items():
        point["systems"][name] = {"repeats": rows, "median": _medians(rows),
                                  "ttft_ms": sorted(ttft[name])}

"""Where LoRA's cost goes in a workload: how much of the engine's slowdown with adapters is time
spent inside the LoRA op, in steps with prefill tokens and in decode-only steps.

    python -m loraplex.bench.lora_share [--dtype bfloat16] [--lora-dtype auto] [--repeats 3]
        [--num-adapters 32] [--num-requests 32] [--concurrency 32] [--prompt-len 16-256]
        [--output-len 16-128]

The same requests (bench/workload.py, distinct adapters, closed loop) run in one process through
three engines in turn, `repeats` times: with one adapter per request as in `loraplex bench`;
the same engine with its LoRA op skipped (slots, per-step adapter metadata and the order of
sequences stay); and the engine without adapters. `--lora-dtype int8` keeps the adapters'
weights in slots as int8 (EngineConfig.lora_dtype). Prints each one's median output tokens/s
and, with adapters, the seconds spent inside the LoRA op. Used for BENCHMARKS.md ("Attempts").
"""

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from loraplex.bench.adapters import private_adapter_cache, write_random_adapter
from loraplex.bench.cli import parse_range, positive_int
from loraplex.bench.loraplex_systems import DEFAULT_RANK, LoraplexEngineSystem
from loraplex.bench.run import ordinary_token_ids
from loraplex.bench.workload import WorkloadSpec, make_workload
from loraplex.config import DTYPES, LORA_DTYPES
from loraplex.model import llama
from loraplex.model.loader import read_config
from loraplex.model.pull import PullError, resolve_model


@contextlib.contextmanager
def lora_op_timed(engine, seconds: dict[str, float], skip: bool):
    """While inside: every LoRA op call of the model adds its time to seconds["prefill"] or
    seconds["decode"] (by the step it runs in), and does nothing at all when `skip`. Decode
    steps then run layer by layer from Python: the one-call step (kernels/decode_layers.py)
    has no Python op to time or skip."""
    real_op, real_step = llama.add_lora, engine.step
    runner = engine.runner
    real_layers = runner.use_layers_kernel, runner.layers_kernel
    runner.use_layers_kernel, runner.layers_kernel = False, None
    kind = "decode"

    def op(y, x, lora_a, lora_b, batch, lora_scales=None, kernel=None):
        start = time.perf_counter()
        if not skip:
            real_op(y, x, lora_a, lora_b, batch, lora_scales, kernel)
        seconds[kind] += time.perf_counter() - start
        return y

    def step():
        nonlocal kind
        scheduler = engine.scheduler
        decoding = not scheduler.waiting and all(
            s.num_computed_tokens >= len(s.prompt_token_ids) for s in scheduler.running)
        kind = "decode" if decoding else "prefill"
        return real_step()

    llama.add_lora, engine.step = op, step
    try:
        yield
    finally:
        llama.add_lora, engine.step = real_op, real_step
        runner.use_layers_kernel, runner.layers_kernel = real_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--lora-dtype", default="auto", choices=LORA_DTYPES)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--num-adapters", type=positive_int, default=32)
    parser.add_argument("--num-requests", type=positive_int, default=32)
    parser.add_argument("--concurrency", type=positive_int, default=32)
    parser.add_argument("--prompt-len", default="16-256")
    parser.add_argument("--output-len", default="16-128")
    args = parser.parse_args()
    try:  # a clear usage error for a bad range or model, not a traceback
        spec = WorkloadSpec(num_requests=args.num_requests, num_adapters=args.num_adapters,
                            concurrency=args.concurrency,
                            prompt_len=parse_range("prompt-len", args.prompt_len),
                            output_len=parse_range("output-len", args.output_len))
        model_dir = resolve_model(args.model)
    except (ValueError, PullError) as e:
        parser.error(str(e))
    config = read_config(model_dir)
    requests = make_workload(spec, ordinary_token_ids(model_dir, config.vocab_size))
    output_tokens = sum(r.max_tokens for r in requests)
    with (tempfile.TemporaryDirectory() as tmp,
          private_adapter_cache(Path(tmp) / "adapter-cache")):
        paths = [write_random_adapter(Path(tmp) / f"a{i}", config, DEFAULT_RANK, seed=i)
                 for i in range(args.num_adapters)]
        with_adapters = LoraplexEngineSystem(max_batch_size=args.concurrency,
                                             lora_dtype=args.lora_dtype)
        base = LoraplexEngineSystem(max_batch_size=args.concurrency, use_adapters=False)
        runs = {"with adapters": (with_adapters, False), "LoRA op skipped": (with_adapters, True),
                "no adapters": (base, False)}
        for system in (with_adapters, base):
            system.setup(model_dir, paths, dtype=args.dtype)
        rates = {name: [] for name in runs}
        op_seconds = {"prefill": [], "decode": []}
        for _ in range(args.repeats):
            for name, (system, skip) in runs.items():
                seconds = {"prefill": 0.0, "decode": 0.0}
                with lora_op_timed(system.engine, seconds, skip):
                    start = time.perf_counter()
                    system.run(requests)
                    rates[name].append(output_tokens / (time.perf_counter() - start))
                if name == "with adapters":
                    for kind, value in seconds.items():
                        op_seconds[kind].append(value)
        for system in (with_adapters, base):
            system.close()
    ceiling = statistics.median(rates["no adapters"])
    print(f"{args.num_requests} requests, {args.num_adapters} adapters, {args.dtype}, "
          f"lora_dtype {args.lora_dtype}, output tokens/s, median of {args.repeats}")
    for name, values in rates.items():
        rate = statistics.median(values)
        rounds = " / ".join(f"{v:.1f}" for v in values)
        print(f"{name:>16}: {rate:.1f} ({rate / ceiling:.2f}x; rounds {rounds})")
    print(f"LoRA op with adapters: {1e3 * statistics.median(op_seconds['prefill']):.1f} ms in "
          f"prefill steps, {1e3 * statistics.median(op_seconds['decode']):.1f} ms in decode "
          f"steps, of {output_tokens / statistics.median(rates['with adapters']):.2f} s a run")


if __name__ == "__main__":
    main()

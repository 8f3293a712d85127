"""Step timing: what one engine step costs with and without adapters, prefill and decode apart.

    python -m loraplex.bench.steps [--dtype bfloat16] [--sequences 32] [--prompt-len 200]
                                   [--decode-steps 40] [--repeats 3]

Two engines in one process (no adapters; one distinct rank-16 all-module adapter per sequence),
each running the same batch in turn, `repeats` times: `sequences` prompts are prefilled
(chunked by max_num_batched_tokens) and then decoded together for `decode-steps` steps. Prints
the median prefill time of the batch and the median decode step. Used to measure engine changes
one at a time (BENCHMARKS.md, "Attempts").
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from loraplex.bench.adapters import private_adapter_cache, write_random_adapter
from loraplex.bench.loraplex_systems import DEFAULT_RANK, engine_config
from loraplex.config import DTYPES
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.sequence import AdapterRequest
from loraplex.model.loader import read_config
from loraplex.model.pull import resolve_model
from loraplex.sampling_params import SamplingParams


def run_batch(engine: LLMEngine, adapters: list[AdapterRequest], args, tag: str):
    """(prefill seconds, decode step seconds each) of one batch."""
    params = SamplingParams(temperature=0, max_tokens=args.decode_steps + 1, ignore_eos=True)
    for i in range(args.sequences):
        prompt = [5 + (i * 7 + j) % 1000 for j in range(args.prompt_len)]
        engine.add_request(f"{tag}-{i}", prompt, params, adapters[i] if adapters else None)
    prefill, decode = 0.0, []
    while engine.has_unfinished():
        decoding = all(s.num_computed_tokens >= len(s.prompt_token_ids)
                       for s in engine.scheduler.running) and not engine.scheduler.waiting
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        if decoding:
            decode.append(elapsed)
        else:
            prefill += elapsed
    return prefill, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--decode-steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    config = read_config(model_dir)
    with (tempfile.TemporaryDirectory() as tmp,
          private_adapter_cache(Path(tmp) / "adapter-cache")):
        paths = [write_random_adapter(Path(tmp) / f"a{i}", config, DEFAULT_RANK, seed=i)
                 for i in range(args.sequences)]
        max_len = args.prompt_len + args.decode_steps + 2
        systems = {}
        for name, used in (("no adapters", []), (f"{args.sequences} adapters", paths)):
            engine = LLMEngine(engine_config(
                model_dir, used, args.dtype, max_batch_size=args.sequences,
                max_loras=args.sequences, max_cpu_loras=None, max_model_len=max_len,
                kv_cache_bytes=None))
            adapters = [AdapterRequest(i, str(p)) for i, p in enumerate(used)]
            for adapter in adapters:
                engine.prewarm(adapter)
            run_batch(engine, adapters, args, "warmup")
            systems[name] = (engine, adapters, [], [])
        for repeat in range(args.repeats):
            for engine, adapters, prefills, decodes in systems.values():
                prefill, decode = run_batch(engine, adapters, args, f"r{repeat}")
                prefills.append(prefill)
                decodes.append(statistics.median(decode))
        print(f"{args.sequences} sequences, prompts of {args.prompt_len}, {args.dtype}, "
              f"median of {args.repeats}")
        for name, (_, _, prefills, decodes) in systems.items():
            print(f"{name:>14}: prefill {statistics.median(prefills):.2f} s, "
                  f"decode step {1e3 * statistics.median(decodes):.1f} ms")


if __name__ == "__main__":
    main()

"""Core runtime micro-benchmark: greedy tokens/s at batch 1 and 32, and slot activation cost.

    python -m loraplex.bench.core [--model smollm2-135m] [--repeats 3]

Each configuration runs `repeats` times, interleaved with the others, and the median is shown.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loraplex import LLM, SamplingParams
from loraplex.bench.adapters import write_random_adapter
from loraplex.lora.adapter import load_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    results: dict[tuple, list[float]] = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(args.model, dtype=dtype, max_loras=32, max_cpu_loras=32, max_lora_rank=16,
                  max_num_seqs=32, max_model_len=512, kv_cache_bytes=1 << 30)
        config = llm.engine.model.config
        adapters = [write_random_adapter(tmp / f"a{i}", config, 16, seed=i) for i in range(32)]
        prompt = llm.tokenizer.encode("The history of the city of Paris begins")
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        llm.generate([prompt] * 32, params, adapters=adapters)  # warm up, load every adapter
        for _ in range(args.repeats):
            for batch in (1, 32):
                for with_adapters in (False, True):
                    chosen = adapters[:batch] if with_adapters else [None] * batch
                    start = time.perf_counter()
                    outs = llm.generate([prompt] * batch, params, adapters=chosen)
                    seconds = time.perf_counter() - start
                    tokens = sum(len(o.token_ids) for o in outs)
                    key = (dtype, batch, "distinct adapters" if with_adapters else "no adapter")
                    results.setdefault(key, []).append(tokens / seconds)
        # Host -> slot activation of one rank-16 all-module adapter.
        slots = llm.engine.adapters.slots
        weights = load_adapter(adapters[0], num_layers=config.num_layers,
                               module_shapes=config.module_shapes(), max_rank=16,
                               dtype=llm.engine.model.embed_tokens.weight.dtype)
        times = []
        for _ in range(50):
            start = time.perf_counter()
            slots.activate(0, weights)
            times.append(time.perf_counter() - start)
        results[(dtype, "activate ms")] = [statistics.median(times) * 1e3]
        llm.engine.shutdown()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}, "
          f"prompt 9 tokens, {args.max_tokens} generated tokens per request, median of "
          f"{args.repeats}")
    print("| dtype | batch | adapters | tokens/s |")
    print("|---|---|---|---|")
    for key, values in results.items():
        if len(key) == 3:
            print(f"| {key[0]} | {key[1]} | {key[2]} | {statistics.median(values):.1f} |")
    for key, values in results.items():
        if len(key) == 2:
            print(f"{key[0]}: activate one rank-16 all-module adapter into a slot: "
                  f"{values[0]:.2f} ms (median of 50)")


if __name__ == "__main__":
    main()

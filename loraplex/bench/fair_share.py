"""Two backlogged tenants on one engine: does each get its weighted share of the service?

Both tenants queue `--requests` requests at once (each with its own adapter), so both stay
backlogged until one's queue is empty. After every engine step the script reads each tenant's
virtual token counter (weighted service: prompt tokens x input cost + generated tokens x output
cost, over its weight). Over the backlogged period it reports:
- the largest gap between the two tenants' weighted service over any window [t1, t2] of steps
  (max - min of the counters' difference), against the VTC bound of Sheng et al. (OSDI 2024,
  Theorem 4.4): 2 x (input_cost x L_input + output_cost x M), L_input the longest prompt and M
  the most tokens the running batch can hold;
- the ratio of the tenants' unweighted service (2 for weights 2 and 1).

    python -m loraplex.bench.fair_share [--model smollm2-135m] [--weights 1,1]
        [--requests 96] [--prompt-len 64] [--output-len 64] [--dtype bfloat16]

In-process (no HTTP): the scheduler alone is measured; threads are torch's default.
"""

import argparse
import tempfile
from pathlib import Path

from loraplex.bench.adapters import private_adapter_cache, write_random_adapter
from loraplex.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.sequence import AdapterRequest
from loraplex.sampling_params import SamplingParams

RANK = 16
TENANTS = ("a", "b")


def run(model: str, weights: tuple[float, float], num_requests: int, prompt_len: int,
        output_len: int, dtype: str, max_num_seqs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="loraplex-fair-share-") as tmp, \
            private_adapter_cache(Path(tmp) / "cache"):
        engine = LLMEngine(EngineConfig(model=model, dtype=dtype, max_num_seqs=max_num_seqs,
                                        max_model_len=prompt_len + output_len + 1))
        adapters = {t: AdapterRequest(i + 1, str(write_random_adapter(
            Path(tmp) / t, engine.model.config, RANK, seed=i))) for i, t in enumerate(TENANTS)}
        for adapter in adapters.values():
            # Loaded before the backlog: otherwise the first tenant runs alone while the other's
            # adapter is still being read, by however long that takes on this machine, and the
            # measure is of the loader's timing instead of the scheduler's.
            engine.prewarm(adapter)
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        prompt = [(7 * i) % 1000 + 10 for i in range(prompt_len)]
        for n in range(num_requests):
            for tenant, weight in zip(TENANTS, weights, strict=True):
                engine.add_request(f"{tenant}{n}", prompt, params, adapters[tenant],
                                   fairness_key=tenant, fairness_weight=weight)
        vtc = engine.scheduler.vtc
        gaps, steps = [], 0
        while True:
            waiting = {s.fairness_key for s in engine.scheduler.waiting}
            if waiting != set(TENANTS):
                break  # one tenant's backlog ran out: the bound is about backlogged tenants
            engine.step()
            steps += 1
            gaps.append(vtc.counter("a") - vtc.counter("b"))
        served = {t: vtc.counter(t) * w for t, w in zip(TENANTS, weights, strict=True)}
        config = engine.config
        batch_tokens = min(engine.blocks.num_blocks * config.block_size,
                           config.max_num_seqs * (prompt_len + output_len))
        bound = 2 * (config.fairness_input_cost * prompt_len
                     + config.fairness_output_cost * batch_tokens)
        engine.shutdown()
    return {"steps": steps, "max_window_gap": max(gaps) - min(gaps), "final_gap": gaps[-1],
            "bound": bound, "ratio": served["a"] / served["b"],
            "served_a": served["a"], "served_b": served["b"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="1,1", help="tenant a's and b's, e.g. 2,1")
    parser.add_argument("--requests", type=int, default=96, help="per tenant")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    options = parser.parse_args()
    try:
        weights = tuple(float(w) for w in options.weights.split(","))
    except ValueError:
        parser.error(f"--weights takes two numbers like 2,1, got {options.weights!r}")
    if len(weights) != 2 or min(weights) <= 0 or min(options.requests, options.prompt_len,
                                                     options.output_len) < 1:
        parser.error("--weights takes two positive numbers; counts must be at least 1")
    result = run(options.model, weights, options.requests, options.prompt_len,
                 options.output_len, options.dtype, options.max_num_seqs)
    print(f"weights {weights[0]:g}:{weights[1]:g}, {result['steps']} backlogged steps: "
          f"service a {result['served_a']:.0f}, b {result['served_b']:.0f} (ratio "
          f"{result['ratio']:.3f}); weighted gap over any window {result['max_window_gap']:.0f}"
          f" (at the end {result['final_gap']:.0f}) against the VTC bound {result['bound']:.0f}")


if __name__ == "__main__":
    main()

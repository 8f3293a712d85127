"""One run's records -> the figures a benchmark table shows (throughput, TTFT, ITL, errors)."""

from __future__ import annotations

from loraplex.bench.system import RequestRecord
from loraplex.bench.workload import percentile

QUANTILES = (50, 90, 99)


def summarize(records: list[RequestRecord], wall_s: float) -> dict:
    """Throughput over `wall_s` (the run's duration) and latency percentiles in milliseconds.

    Failed requests count as errors and nowhere else; output tokens are generated tokens only,
    total tokens add the prompts of the requests that completed. A percentile with no values
    (every request failed) is None.
    """
    if wall_s <= 0:
        raise ValueError(f"wall_s must be positive, got {wall_s}")
    done = [r for r in records if r.error is None]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    ttft_ms = [1e3 * r.ttft_s for r in done if r.ttft_s is not None]
    itl_ms = [1e3 * gap for r in done for gap in r.itl_s]
    latency_ms = [1e3 * (r.token_times_s[-1] - r.arrival_s) for r in done if r.token_times_s]
    summary = {
        "requests": len(records),
        "completed": len(done),
        "errors": len(records) - len(done),
        "wall_s": wall_s,
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
        "requests_per_s": len(done) / wall_s,
        "output_tokens_per_s": output_tokens / wall_s,
        "total_tokens_per_s": (output_tokens + prompt_tokens) / wall_s,
    }
    for name, values in (("ttft_ms", ttft_ms), ("itl_ms", itl_ms), ("latency_ms", latency_ms)):
        for q in QUANTILES:
            summary[f"{name}_p{q}"] = percentile(values, q)
    return summary

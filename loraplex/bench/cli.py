"""`loraplex bench`: several systems on one workload, side by side, with a report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Annotated

import typer

from loraplex.cli_support import err, fail


def parse_int_list(name: str, text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--{name} should be a comma list of integers, got {text!r}") from None
    if not values:
        raise ValueError(f"--{name} is empty")
    return values


def positive_int(text: str) -> int:
    """An argparse type for the benchmark scripts' counts: a clear usage error, not a traceback."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"should be a whole number of at least 1, got {text!r}")
    return value


def parse_range(name: str, text: str) -> tuple[int, int]:
    """'16-256' -> (16, 256); '64' -> (64, 64)."""
    low, sep, high = text.partition("-")
    try:
        values = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise ValueError(f"--{name} should look like 16-256 (or one number), got {text!r}"
                         ) from None
    if not 1 <= values[0] <= values[1]:
        raise ValueError(f"--{name} must be 1 <= low <= high, got {text!r}")
    return values


def bench_command(
    model: Annotated[str, typer.Option(help="Default model name or checkpoint dir")] = (
        "smollm2-135m"
    ),
    systems: Annotated[str, typer.Option(
        help="Comma list of: loraplex, loraplex-base (no adapters), loraplex-resident (every "
             "adapter in a slot of its own), loraplex-rank-max / loraplex-paged (the memory "
             "of 32 max-rank slots as such slots, or as pages by rank), loraplex-http, "
             "transformers, peft-mixed, "
             "peft-switch, llama.cpp")] = "loraplex,loraplex-base",
    num_adapters: Annotated[str, typer.Option(
        help="Distinct adapters; a comma list sweeps, e.g. 1,8,32")] = "32",
    popularity: Annotated[str, typer.Option(
        help="Which adapter each request uses: distinct | uniform | zipf | identical")] = (
        "distinct"),
    zipf_alpha: Annotated[float, typer.Option(help="Skew of --popularity zipf")] = 1.0,
    arrival: Annotated[str, typer.Option(
        help="closed (clients wait for their answer) | poisson | gamma")] = "closed",
    concurrency: Annotated[int, typer.Option(
        help="Closed loop: clients; open loop: requests in flight at most")] = 32,
    rate: Annotated[float, typer.Option(help="poisson / gamma: requests per second")] = 4.0,
    cv: Annotated[float, typer.Option(help="gamma: coefficient of variation of the gaps")] = 1.0,
    num_requests: Annotated[int, typer.Option(help="Requests per run")] = 64,
    prompt_len: Annotated[str, typer.Option(help="Prompt tokens, uniform in LOW-HIGH")] = (
        "16-256"),
    output_len: Annotated[str, typer.Option(
        help="Generated tokens, uniform in LOW-HIGH (exactly, EOS ignored)")] = "16-128",
    rank: Annotated[str, typer.Option(
        help="LoRA rank of the random adapters, or a mix, e.g. 8,16,32,64 (adapter i has the "
             "(i mod 4)-th: every popularity has every rank)")] = "16",
    targets: Annotated[str, typer.Option(help="all | attn | a comma list, e.g. q_proj,v_proj")] = (
        "all"),
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
    repeats: Annotated[int, typer.Option(help="Runs per system; the median is reported")] = 3,
    seed: Annotated[int, typer.Option(help="Seeds the workload and the adapters")] = 0,
    out: Annotated[Path, typer.Option(help="Where results.json, results.md and plots go")] = (
        Path("bench-results")),
    isolate: Annotated[bool, typer.Option(
        "--isolate/--in-process",
        help="One process per system, so they cannot disturb each other")] = True,
    max_cpu_loras: Annotated[int | None, typer.Option(
        help="loraplex's host cache (32 slots either way); default: every adapter stays loaded, "
             "fewer makes requests read their adapter from disk again")] = None,
):
    """Benchmark systems side by side on one seeded workload (alternating, repeated, medians):
    throughput, TTFT / ITL and adapter cache figures; writes JSON, markdown and PNG plots."""
    from loraplex.bench.report import markdown_table
    from loraplex.bench.run import check_systems, run_benchmark
    from loraplex.bench.workload import WorkloadSpec
    from loraplex.config import DTYPES
    from loraplex.model.pull import PullError
    from loraplex.plan import parse_targets

    try:
        names = [name.strip() for name in systems.split(",") if name.strip()]
        check_systems(names)
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {repeats}")
        modules = parse_targets(targets)
        specs = [WorkloadSpec(
            num_requests=num_requests, num_adapters=n, popularity=popularity,
            zipf_alpha=zipf_alpha, arrival=arrival, concurrency=concurrency, rate=rate, cv=cv,
            prompt_len=parse_range("prompt-len", prompt_len),
            output_len=parse_range("output-len", output_len), seed=seed,
        ) for n in parse_int_list("num-adapters", num_adapters)]
        if "loraplex-base" not in names and any(s.num_adapters == 0 for s in specs):
            err.print("note: with 0 adapters every system runs the base model", highlight=False)
        results = run_benchmark(model, names, specs, repeats=repeats, dtype=dtype, out_dir=out,
                                rank=parse_int_list("rank", rank), targets=modules,
                                isolate=isolate,
                                max_cpu_loras=max_cpu_loras,
                                log=lambda line: err.print(line, highlight=False))
    except (ValueError, OSError, PullError) as e:  # BenchError, WorkloadError: clear messages
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted")
    typer.echo(markdown_table(results))
    typer.echo("")
    for path in results["files"]:
        typer.echo(f"wrote {path}")

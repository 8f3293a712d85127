"""A benchmark's results as files: JSON (everything), a markdown table, PNG plots.

The results (from run.run_benchmark) are a dict:
    model, dtype, repeats, rank, targets, machine: {cpu_count, torch, device, dtype, ...}
    systems: [{key, name, setup_s}]            in the order they were given
    points: [{spec: WorkloadSpec as a dict,     one per number of adapters of a sweep
              systems: {name: {repeats: [summary + stats per repeat],
                               median: {figure: median over repeats},
                               ttft_ms: [every TTFT of every repeat, sorted]}}}]
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from loraplex.bench.loraplex_systems import BASELINE_NAME

JSON_FILE = "results.json"
MARKDOWN_FILE = "results.md"
THROUGHPUT_PLOT = "throughput_vs_adapters.png"
TTFT_PLOT = "ttft_cdf.png"


def _number(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pair(median: dict, first: str, second: str, digits: int = 1) -> str:
    return f"{_number(median.get(first), digits)} / {_number(median.get(second), digits)}"


def _count(value) -> str:
    return "-" if value is None else f"{value:g}"


def workload_line(spec: dict) -> str:
    if spec["arrival"] == "closed":
        arrival = f"closed loop, {spec['concurrency']} clients"
    else:
        cv = f", cv {spec['cv']:g}" if spec["arrival"] == "gamma" else ""
        arrival = (f"{spec['arrival']} arrivals at {spec['rate']:g}/s{cv}, at most "
                   f"{spec['concurrency']} in flight")
    popularity = spec["popularity"] + (f" (alpha {spec['zipf_alpha']:g})"
                                       if spec["popularity"] == "zipf" else "")
    return (f"{spec['num_requests']} requests, {popularity} popularity, {arrival}, prompts "
            f"{spec['prompt_len'][0]}-{spec['prompt_len'][1]} tokens, outputs "
            f"{spec['output_len'][0]}-{spec['output_len'][1]} tokens (greedy, exactly), "
            f"seed {spec['seed']}")


def markdown_table(results: dict) -> str:
    """One row per system (and number of adapters, in a sweep); medians over the repeats."""
    header = ("| system | adapters | output tok/s | total tok/s | req/s | vs no adapters | "
              "TTFT p50 / p99 ms | ITL p50 / p99 ms | slot hits / misses | errors |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for point in results["points"]:
        by_name = point["systems"]
        baseline = by_name.get(BASELINE_NAME, {}).get("median", {}).get("output_tokens_per_s")
        for system in results["systems"]:
            median = by_name[system["name"]]["median"]
            tokens = median.get("output_tokens_per_s")
            ratio = f"{tokens / baseline:.2f}x" if baseline and tokens is not None else "-"
            lines.append(
                f"| {system['name']} | {point['spec']['num_adapters']} | {_number(tokens)} | "
                f"{_number(median.get('total_tokens_per_s'))} | "
                f"{_number(median.get('requests_per_s'), 2)} | {ratio} | "
                f"{_pair(median, 'ttft_ms_p50', 'ttft_ms_p99')} | "
                f"{_pair(median, 'itl_ms_p50', 'itl_ms_p99', 2)} | "
                f"{_count(median.get('slot_hits'))} / {_count(median.get('slot_misses'))} | "
                f"{_count(median.get('errors'))} |")
    return "\n".join(lines)


def markdown_report(results: dict) -> str:
    machine = results["machine"]
    specs = [point["spec"] for point in results["points"]]
    adapters = ", ".join(str(s["num_adapters"]) for s in specs)
    lines = [
        f"# loraplex bench: {results['model']}, {results['dtype']}",
        "",
        f"Workload: {workload_line(specs[0])}; adapters: {adapters} (random, rank "
        f"{results['rank']}, {', '.join(results['targets'])}). Median of {results['repeats']} "
        "repeats, systems run in rotating order.",
        "",
        f"Machine: {machine['device']}{' (' + machine['gpu'] + ')' if 'gpu' in machine else ''}, "
        f"{machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads, torch "
        f"{machine['torch']}, python {machine['python']}.",
        "",
        markdown_table(results),
        "",
        "TTFT counts from each request's arrival (queueing included); ITL is the gap between "
        "consecutive tokens of a request; output tokens/s counts generated tokens only, total "
        "adds the prompts.",
    ]
    return "\n".join(lines) + "\n"


def plot_throughput(results: dict, path: Path) -> Path:
    """Output tokens/s (median) against the number of adapters, one line per system."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.add_subplot()
    counts = [point["spec"]["num_adapters"] for point in results["points"]]
    for system in results["systems"]:
        values = [point["systems"][system["name"]]["median"].get("output_tokens_per_s")
                  for point in results["points"]]
        axes.plot(counts, [float("nan") if v is None else v for v in values], marker="o",
                  label=system["name"])
    if min(counts) > 0 and max(counts) >= 8 * min(counts):
        axes.set_xscale("log", base=2)
    axes.set_xticks(counts, [str(c) for c in counts])
    axes.minorticks_off()
    axes.set_xlabel("adapters")
    axes.set_ylabel("output tokens/s (median)")
    axes.set_title(f"{Path(results['model']).name}, {results['dtype']}")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)
    return path


def plot_ttft_cdf(results: dict, path: Path) -> Path:
    """The distribution of TTFT per system (every request of every repeat), one panel per
    number of adapters."""
    from matplotlib.figure import Figure

    points = results["points"]
    figure = Figure(figsize=(5.2 * len(points), 4.2), layout="constrained")
    for i, point in enumerate(points):
        axes = figure.add_subplot(1, len(points), i + 1)
        for system in results["systems"]:
            ttft = point["systems"][system["name"]]["ttft_ms"]
            if ttft:
                axes.step(ttft, [(k + 1) / len(ttft) for k in range(len(ttft))], where="post",
                          label=system["name"])
        axes.set_xlabel("time to first token (ms)")
        axes.set_ylabel("share of requests")
        count = point["spec"]["num_adapters"]
        axes.set_title(f"{count} adapter{'' if count == 1 else 's'}")
        axes.set_ylim(0, 1.02)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.savefig(path, dpi=120)
    return path


def can_plot() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_report(results: dict, out_dir: Path) -> list[Path]:
    """results.json, results.md, ttft_cdf.png and, for a sweep over the number of adapters,
    throughput_vs_adapters.png (the plots only where matplotlib is installed); returns their
    paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / JSON_FILE, out_dir / MARKDOWN_FILE]
    paths[0].write_text(json.dumps({k: v for k, v in results.items() if k != "files"},
                                   indent=2) + "\n")
    paths[1].write_text(markdown_report(results))
    if not can_plot():
        return paths
    if len({point["spec"]["num_adapters"] for point in results["points"]}) > 1:
        paths.append(plot_throughput(results, out_dir / THROUGHPUT_PLOT))
    paths.append(plot_ttft_cdf(results, out_dir / TTFT_PLOT))
    return paths

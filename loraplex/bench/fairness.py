"""Do busy tenants slow a quiet one? `loraplex serve` in its own process, clients in this one.

Busy tenants each keep `--streams` streaming chats in flight (long prompts and answers); quiet
tenants send one short streaming chat at a time. For each scheduler (alternating fair, fcfs, ...)
a fresh server answers: the quiet tenants alone (their solo figures), then the quiet tenants
while the busy ones are saturating it. Reported per scheduler: the quiet tenants' TTFT and e2e
latency (p50, p90) solo and loaded, their ratios, and the busy tenants' generated tokens/s (the
engine's count of generated tokens over the loaded window, less the quiet tenants': counting
finished busy requests instead would miss the many that are half done when a short window ends).

    python -m loraplex.bench.fairness [--model smollm2-135m] [--schedulers fair,fcfs]
        [--busy 3] [--quiet 2] [--streams 32] [--quiet-requests 8] [--rounds 1]
        [--max-num-seqs 64] [--max-num-batched-tokens 512] [--dtype float32]

Threads: the server runs torch's default (one OpenMP thread per core); this process only waits
on sockets, so it barely competes for them.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loraplex.bench.adapters import write_random_adapter
from loraplex.config import ConfigError, EngineConfig
from loraplex.home import HOME_ENV
from loraplex.model.loader import read_config
from loraplex.model.pull import resolve_model
from loraplex.registry import Registry
from loraplex.vault.artifacts import ArtifactSealer

READY_TIMEOUT_S = 600
ADAPTER_RANK = 16
BUSY_PROMPT = "Tell me everything about the history of the city, in detail. " * 12  # ~150 tok
QUIET_PROMPT = "What are your opening hours?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_tenants(home: Path, model: str, tenants: list[str]) -> tuple[dict[str, str], str]:
    """A tenant per name with one random adapter `bot`; returns tenant -> key, and an admin
    key."""
    config = read_config(resolve_model(model))
    registry = Registry(home)
    keys = {}
    for i, tenant in enumerate(tenants):
        registry.create_tenant(tenant, actor="bench")
        adapter = write_random_adapter(home / "src" / tenant, config, ADAPTER_RANK, seed=i)
        registry.push_version(tenant, "bot", adapter, actor="bench", validate=None,
                              sealer=ArtifactSealer.for_home(home))
        keys[tenant] = registry.create_key(tenant, actor="bench")[1]
    admin_key = registry.create_admin_key(actor="bench")[1]
    registry.close()
    return keys, admin_key


async def _chat(client: httpx.AsyncClient, url: str, key: str, prompt: str,
                max_tokens: int) -> tuple[float, float, int]:
    """(TTFT, e2e seconds, tokens) of one streaming chat completion."""
    body = {"model": "bot", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"]["content"]:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft if ttft is not None else time.perf_counter() - start, \
        time.perf_counter() - start, tokens


async def _quiet(url: str, keys: list[str], num_requests: int, max_tokens: int) -> list:
    """Each quiet tenant sends `num_requests` chats one after another; all (ttft, e2e)."""
    async with httpx.AsyncClient(timeout=600) as client:
        async def one_tenant(key):
            return [await _chat(client, url, key, QUIET_PROMPT, max_tokens)
                    for _ in range(num_requests)]
        results = await asyncio.gather(*(one_tenant(k) for k in keys))
    return [(ttft, e2e) for per_tenant in results for ttft, e2e, _ in per_tenant]


async def _generated_tokens(client: httpx.AsyncClient, url: str, admin_key: str) -> int:
    response = await client.get(f"{url}/admin/engine",
                                headers={"Authorization": f"Bearer {admin_key}"})
    return response.json()["generated_tokens"]


async def _loaded(url: str, admin_key: str, busy: list[str], quiet: list[str], streams: int,
                  num_requests: int, quiet_tokens: int, busy_tokens: int) -> tuple[list, float]:
    """Quiet tenants' (ttft, e2e) while every busy tenant keeps `streams` chats in flight, and
    the busy tenants' generated tokens per second over that time."""
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=len(busy) * streams + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def keep_busy(key):
            while not stop.is_set():
                await _chat(client, url, key, BUSY_PROMPT, busy_tokens)

        workers = [asyncio.create_task(keep_busy(k)) for k in busy for _ in range(streams)]
        await asyncio.sleep(5)  # let the busy tenants fill the engine first
        start, before = time.perf_counter(), await _generated_tokens(client, url, admin_key)
        quiet_results = await _quiet(url, quiet, num_requests, quiet_tokens)
        generated = await _generated_tokens(client, url, admin_key) - before
        busy_generated = generated - len(quiet) * num_requests * quiet_tokens
        throughput = busy_generated / (time.perf_counter() - start)
        stop.set()
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return quiet_results, throughput


def check_return_window(parser: argparse.ArgumentParser, milliseconds: float) -> None:
    """Refuse a --return-window-ms the engine would refuse, before any server starts."""
    try:
        EngineConfig(return_window_ms=milliseconds)
    except ConfigError as e:
        parser.error(f"--return-window-ms: {e}")


def start_server(model: str, port: int, env: dict, scheduling: str, dtype: str,
                 max_num_seqs: int, max_num_batched_tokens: int, *options: str
                 ) -> subprocess.Popen:
    """`loraplex serve` with these settings (and further `options`), once it is ready."""
    server = subprocess.Popen(
        [sys.executable, "-m", "loraplex.cli", "serve", "--model", model, "--port", str(port),
         "--dtype", dtype, "--scheduling", scheduling, "--max-loras", "8",
         "--max-num-seqs", str(max_num_seqs),
         "--max-num-batched-tokens", str(max_num_batched_tokens), *options],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_ready(server, port)


def wait_ready(server: subprocess.Popen, port: int,
               timeout_s: float = READY_TIMEOUT_S) -> subprocess.Popen:
    """The server once its /readyz answers 200; RuntimeError if it exits or takes too long
    (then it is killed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"loraplex serve exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("loraplex serve did not become ready in time")


def stop_server(server: subprocess.Popen) -> None:
    """Ctrl-C, as a user stops it (running requests finish); killed if it hangs."""
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 \
        else values[0]


def _summary(results: list) -> dict:
    ttfts, e2es = [r[0] for r in results], [r[1] for r in results]
    return {"ttft_p50": _percentile(ttfts, 50), "ttft_p90": _percentile(ttfts, 90),
            "e2e_p50": _percentile(e2es, 50), "e2e_p90": _percentile(e2es, 90)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="the server's seats")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512,
                        help="the server's tokens a step")
    parser.add_argument("--schedulers", default="fair,fcfs")
    parser.add_argument("--busy", type=int, default=3)
    parser.add_argument("--quiet", type=int, default=2)
    parser.add_argument("--streams", type=int, default=32, help="per busy tenant")
    parser.add_argument("--quiet-requests", type=int, default=8, help="per quiet tenant")
    parser.add_argument("--quiet-tokens", type=int, default=64)
    parser.add_argument("--busy-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1, help="each scheduler, alternating")
    parser.add_argument("--return-window-ms", type=float, default=EngineConfig.return_window_ms,
                        help="the server's --return-window-ms, default %(default)s")
    options = parser.parse_args()
    schedulers = options.schedulers.split(",")
    if any(s not in ("fair", "fcfs") for s in schedulers) or min(
            options.busy, options.quiet, options.streams, options.quiet_requests,
            options.rounds) < 1:
        parser.error("--schedulers takes fair and/or fcfs; counts must be at least 1")
    check_return_window(parser, options.return_window_ms)

    busy = [f"busy{i}" for i in range(options.busy)]
    quiet = [f"quiet{i}" for i in range(options.quiet)]
    with tempfile.TemporaryDirectory(prefix="loraplex-fairness-") as tmp:
        home = Path(tmp)
        keys, admin_key = setup_tenants(home, options.model, busy + quiet)
        # The adapter cache is the run's own; the CPU kernel is built once, in the user's home.
        env = {**os.environ, HOME_ENV: str(home), "LORAPLEX_ADAPTER_CACHE": str(home / "cache"),
               "LORAPLEX_KERNEL_CACHE": os.environ.get("LORAPLEX_KERNEL_CACHE") or str(
                   Path.home() / ".loraplex" / "cache" / "kernels")}
        rows = []
        for round_ in range(options.rounds):
            for scheduling in schedulers:
                row = {"round": round_, "scheduling": scheduling,
                       **_one_server(options, env, scheduling, [keys[b] for b in busy],
                                     [keys[q] for q in quiet], admin_key)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    _print_table(rows)


def _one_server(options, env: dict, scheduling: str, busy_keys: list[str],
                quiet_keys: list[str], admin_key: str) -> dict:
    """A fresh server: the quiet tenants alone, then beside the busy ones; the summaries."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(options.model, port, env, scheduling, options.dtype,
                          options.max_num_seqs, options.max_num_batched_tokens,
                          "--return-window-ms", str(options.return_window_ms))
    try:
        asyncio.run(_quiet(url, quiet_keys, 1, 4))  # warm-up
        solo = _summary(asyncio.run(_quiet(url, quiet_keys, options.quiet_requests,
                                           options.quiet_tokens)))
        results, throughput = asyncio.run(_loaded(
            url, admin_key, busy_keys, quiet_keys, options.streams, options.quiet_requests,
            options.quiet_tokens, options.busy_tokens))
    finally:
        stop_server(server)
    loaded = _summary(results)
    return {"busy_tok_s": throughput,
            **{f"solo_{k}": v for k, v in solo.items()},
            **{f"loaded_{k}": v for k, v in loaded.items()},
            "ttft_x": loaded["ttft_p50"] / solo["ttft_p50"],
            "e2e_x": loaded["e2e_p50"] / solo["e2e_p50"]}


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'sched':<6} {'solo TTFT p50/p90':>18} {'loaded TTFT p50/p90':>20} "
          f"{'x':>6} {'solo e2e p50/p90':>17} {'loaded e2e p50/p90':>19} {'x':>6} "
          f"{'busy tok/s':>10}")
    for r in rows:
        print(f"{r['scheduling']:<6} {r['solo_ttft_p50']:8.2f} /{r['solo_ttft_p90']:7.2f} s "
              f"{r['loaded_ttft_p50']:9.2f} /{r['loaded_ttft_p90']:7.2f} s {r['ttft_x']:6.1f} "
              f"{r['solo_e2e_p50']:7.2f} /{r['solo_e2e_p90']:6.2f} s "
              f"{r['loaded_e2e_p50']:8.2f} /{r['loaded_e2e_p90']:6.2f} s {r['e2e_x']:6.1f} "
              f"{r['busy_tok_s']:10.1f}")


if __name__ == "__main__":
    main()

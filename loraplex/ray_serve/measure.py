"""Measure `loraplex serve --ray` against the single-machine `loraplex serve`, both started
through the CLI on this machine: start-up time, memory per process, adapter loads vs requests,
and the latency the gateway hop adds to a short non-streaming completion.

    python -m loraplex.ray_serve.measure [--model smollm2-135m] [--replicas 2] [--requests 20]
"""

import argparse
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from loraplex.bench.adapters import write_random_adapter
from loraplex.home import HOME_ENV
from loraplex.model.loader import read_config
from loraplex.model.pull import resolve_model
from loraplex.registry import Registry
from loraplex.vault.artifacts import ArtifactSealer

READY_TIMEOUT_S = 600
ADAPTER_RANK = 8
REPLICA_TITLE = "ServeReplica:loraplex:EngineReplica"  # Ray's process title for a replica
GATEWAY_TITLE = "ServeReplica:loraplex:Gateway"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _complete(url: str, key: str, model: str, max_tokens: int) -> float:
    """Seconds for one greedy non-streaming chat completion."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120,
                   headers={"Authorization": f"Bearer {key}"})
    r.raise_for_status()
    return time.perf_counter() - start


def _start(args: list[str], env: dict, url: str, key: str) -> tuple[subprocess.Popen, float]:
    """Start `loraplex serve ARGS`; return it and the seconds until it answered a request."""
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "loraplex.cli", "serve", *args], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while time.perf_counter() - start < READY_TIMEOUT_S:
        if server.poll() is not None:
            raise RuntimeError(f"loraplex serve {' '.join(args)} exited with {server.returncode}")
        try:
            _complete(url, key, "bot", 1)
            return server, time.perf_counter() - start
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"loraplex serve {' '.join(args)} did not answer in time")


def _stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGINT)  # the Ctrl-C path: the Ray app is deleted, Ray stops
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()


def _rss_mib(processes) -> list[float]:
    return [p.memory_info().rss / 2**20 for p in processes]


def _ray_processes(title: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(title in part for part in p.info["cmdline"] or []):
            found.append(p)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--tenants", type=int, default=4, help="one adapter each")
    parser.add_argument("--requests", type=int, default=20, help="per system, alternating")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--cpus-per-replica", type=float,
                        default=min(1.0, (os.cpu_count() or 1) / 2))
    options = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="loraplex-measure-"))
    registry = Registry(home)
    _, admin_key = registry.create_admin_key(actor="measure")  # `serve` then makes none
    config = read_config(resolve_model(options.model))
    keys = []
    for i in range(options.tenants):
        tenant = f"tenant{i}"
        registry.create_tenant(tenant, actor="measure")
        keys.append(registry.create_key(tenant, actor="measure")[1])
        adapter = write_random_adapter(home / "peft" / tenant, config, ADAPTER_RANK, seed=i)
        registry.push_version(tenant, "bot", adapter, actor="measure", validate=None,
                              sealer=ArtifactSealer.for_home(home))

    common = ["--model", options.model, "--max-model-len", "512", "--kv-cache", "256MiB",
              "--max-loras", "2", "--max-cpu-loras", "4"]
    local_port, ray_port = _free_port(), _free_port()
    local_url, ray_url = f"http://127.0.0.1:{local_port}", f"http://127.0.0.1:{ray_port}"
    env = {**os.environ, HOME_ENV: str(home)}
    # Ray gives each replica floor(its CPUs) torch threads (at least 1); the single-machine
    # engine gets as many, so the latency difference is the gateway hop, not the thread count.
    threads = str(max(1, math.floor(options.cpus_per_replica)))
    local, local_start_s = _start([*common, "--port", str(local_port)],
                                  {**env, "OMP_NUM_THREADS": threads}, local_url, keys[0])
    ray_server = None
    try:
        ray_server, ray_start_s = _start(
            [*common, "--port", str(ray_port), "--ray", "--replicas", str(options.replicas),
             "--cpus-per-replica", str(options.cpus_per_replica)], env, ray_url, keys[0])
        for key in keys:  # warm-up: every adapter loaded on both systems
            _complete(local_url, key, "bot", options.max_tokens)
            _complete(ray_url, key, "bot", options.max_tokens)
        local_s, ray_s = [], []
        for i in range(options.requests):
            key = keys[i % len(keys)]
            local_s.append(_complete(local_url, key, "bot", options.max_tokens))
            ray_s.append(_complete(ray_url, key, "bot", options.max_tokens))
        stats = httpx.get(f"{ray_url}/admin/engine", timeout=30,
                          headers={"Authorization": f"Bearer {admin_key}"}).json()
        replica_mib = _rss_mib(_ray_processes(REPLICA_TITLE))
        gateway_mib = _rss_mib(_ray_processes(GATEWAY_TITLE))
        local_mib = _rss_mib([psutil.Process(local.pid)])
    finally:
        if ray_server is not None:
            _stop(ray_server)
        _stop(local)
        shutil.rmtree(home)

    local_ms, ray_ms = 1e3 * statistics.median(local_s), 1e3 * statistics.median(ray_s)
    print(f"model {options.model}, {options.tenants} tenants, {options.replicas} replicas at "
          f"{options.cpus_per_replica:g} CPU, {os.cpu_count()} cores")
    print(f"start-up (process start to first answer): single machine {local_start_s:.1f} s, "
          f"Ray {ray_start_s:.1f} s")
    print(f"memory (RSS): single machine {local_mib[0]:.0f} MiB; Ray replicas "
          f"{', '.join(f'{m:.0f}' for m in replica_mib)} MiB, gateway "
          f"{', '.join(f'{m:.0f}' for m in gateway_mib)} MiB")
    print(f"adapter loads vs requests (Ray, warm-up included): {stats['adapter_loads']} loads, "
          f"{stats['requests']} requests; per replica "
          + ", ".join(f"{r['adapter_loads']}/{r['requests']}" for r in stats["replicas"]))
    print(f"median latency of a {options.max_tokens}-token completion over {options.requests} "
          f"alternating requests: single machine {local_ms:.1f} ms, Ray {ray_ms:.1f} ms "
          f"(gateway hop +{ray_ms - local_ms:.1f} ms)")


if __name__ == "__main__":
    main()

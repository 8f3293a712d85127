"""What the first request to a freshly published or promoted version pays for its adapter,
over HTTP against a real `loraplex serve`, and after the server restarts.

    python -m loraplex.bench.first_request [--model smollm2-135m] [--versions 10] [--rank 16]
        [--restarts 3] [--max-loras N] [--dtype float32]

A home with the tenant and another one (`warmup`); `serve` in a process of its own (prefix
cache off, so two requests of one version cost the same but for the adapter). Each round
publishes a new version of the tenant's adapter: even rounds upload it with `promote=true`,
odd rounds upload it and then call `promote`, as the admin API and the console do. Then one
request of the other tenant (with `--max-loras 1` it takes the only slot) and the first
request to the new version (a chat completion of one token), then a second one of the same
length.

What the adapter cost the first request is read from the server's own clocks (`/admin/engine`'s
totals of slot copies and disk loads, before and after it): the load from disk runs at publish
(pre-warm), the copy into a slot on the first request unless the version still has the slot
pre-warm gave it. The host-cache misses during first requests count the disk loads a request
waited for (0 when pre-warm did its job). The first request's latency less the second's is
reported too, as an end-to-end check (this machine's noise is larger than the cost measured).

Then the server restarts (`--restarts` times), and the same is measured for the serving version
(pre-warmed at start from the usage ledger's most recently used adapters). A fresh server's
first requests pay warm-ups of its own, so another tenant's requests go first, every time.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loraplex.bench.adapters import write_random_adapter
from loraplex.bench.fairness import free_port, stop_server, wait_ready
from loraplex.home import ADAPTER_CACHE_DIR, ADAPTER_CACHE_ENV, HOME_ENV
from loraplex.model.loader import read_config
from loraplex.model.pull import resolve_model
from loraplex.registry import Registry
from loraplex.server.admin import UPLOAD_FILES
from loraplex.vault.artifacts import ArtifactSealer

TENANT, ADAPTER = "acme", "bot"
WARMUP = "warmup"  # another tenant: a fresh server's first requests pay its own warm-up
NUM_WARMUP_REQUESTS = 3
TARGET_P50_MS, TARGET_P99_MS = 10.0, 20.0  # issue 19
WORDS = "sea wind ship log night shelf keeper light storm harbour tide rope lamp".split()


class Server:
    def __init__(self, home: Path, model: str, dtype: str, max_loras: int | None):
        self.home, self.model, self.dtype = home, model, dtype
        self.slot_args = [] if max_loras is None else ["--max-loras", str(max_loras)]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, HOME_ENV: str(self.home),
               ADAPTER_CACHE_ENV: str(self.home / ADAPTER_CACHE_DIR)}
        with open(self.home / "serve.log", "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "loraplex.cli", "serve", "--model", self.model,
                 "--port", str(self.port), "--dtype", self.dtype, "--no-prefix-caching",
                 *self.slot_args],
                env=env, stdout=subprocess.DEVNULL, stderr=log)
        wait_ready(self.process, self.port)

    def stop(self) -> None:
        stop_server(self.process)


def message(seed: int) -> list[dict]:
    """A short question of a fixed number of words (the same length every round)."""
    words = [WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(12)]
    return [{"role": "user", "content": " ".join(words)}]


def latency(http: httpx.Client, key: str, seed: int) -> float:
    start = time.perf_counter()
    r = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                  json={"model": ADAPTER, "messages": message(seed), "max_tokens": 1,
                        "temperature": 0}, timeout=120)
    elapsed = time.perf_counter() - start
    r.raise_for_status()
    return elapsed


def warm_up(http: httpx.Client, key: str) -> None:
    for seed in range(NUM_WARMUP_REQUESTS):
        latency(http, key, 100 + seed)


def engine_stats(http: httpx.Client, admin: str) -> dict:
    r = http.get("/admin/engine", headers={"Authorization": f"Bearer {admin}"}, timeout=30)
    r.raise_for_status()
    return r.json()


def publish(http: httpx.Client, admin: str, adapter_dir: Path, promote_with_call: bool) -> int:
    headers = {"Authorization": f"Bearer {admin}"}
    files = {name: (name, (adapter_dir / name).read_bytes()) for name in UPLOAD_FILES}
    r = http.post(f"/admin/tenants/{TENANT}/adapters/{ADAPTER}/versions", headers=headers,
                  files=files, params={"promote": str(not promote_with_call).lower()},
                  timeout=120)
    r.raise_for_status()
    number = r.json()["number"]
    if promote_with_call:
        r = http.post(f"/admin/tenants/{TENANT}/adapters/{ADAPTER}/promote", headers=headers,
                      json={"version": number}, timeout=120)
        r.raise_for_status()
    return number


def first_request(http: httpx.Client, key: str, admin: str, seed: int) -> dict:
    """What the adapter cost the first request, by the server's own clocks: the copy into a
    slot it waited for and the disk loads it waited for (the engine's totals before and after
    it); and, end to end, its latency less a second one's (this machine's noise is tens of ms
    a request, more than the cost measured, so that one is a sanity check, not the figure)."""
    before = engine_stats(http, admin)
    first = latency(http, key, seed)
    after = engine_stats(http, admin)
    second = latency(http, key, seed + 1)
    waited = after["host_misses"] - before["host_misses"]
    load_ms = after["host_load_ms_total"] - before["host_load_ms_total"] if waited else 0.0
    activate_ms = after["slot_activate_ms_total"] - before["slot_activate_ms_total"]
    return {"adapter_ms": load_ms + activate_ms, "slot_activate_ms": activate_ms,
            "slot_activations": after["slot_misses"] - before["slot_misses"],
            "loads_waited_for": waited, "load_ms": load_ms, "first_ms": 1e3 * first,
            "second_ms": 1e3 * second, "first_less_second_ms": 1e3 * (first - second)}


def summary(rows: list[dict]) -> dict:
    costs = sorted(r["adapter_ms"] for r in rows)
    p99 = costs[min(len(costs) - 1, round(0.99 * (len(costs) - 1)))]
    return {"rounds": len(rows), "adapter_ms_p50": statistics.median(costs),
            "adapter_ms_p99": p99, "adapter_ms_max": costs[-1],
            "slot_activations": sum(r["slot_activations"] for r in rows),
            "loads_waited_for": sum(r["loads_waited_for"] for r in rows),
            "first_ms_p50": statistics.median(r["first_ms"] for r in rows),
            "second_ms_p50": statistics.median(r["second_ms"] for r in rows),
            "first_less_second_ms_p50": statistics.median(
                r["first_less_second_ms"] for r in rows)}


def run(model: str, num_versions: int, rank: int, dtype: str, root: Path,
        restarts: int = 3, max_loras: int | None = None) -> dict:
    model_dir = resolve_model(model)
    config = read_config(model_dir)
    home = root / "home"
    home.mkdir()
    keys = {}
    with Registry(home) as registry:
        for seed, tenant in enumerate((TENANT, WARMUP)):
            registry.create_tenant(tenant, actor="bench")
            src = write_random_adapter(root / tenant, config, rank, seed=seed)
            registry.push_version(tenant, ADAPTER, src, actor="bench", validate=None,
                                  sealer=ArtifactSealer.for_home(home))
            keys[tenant] = registry.create_key(tenant, actor="bench")[1]
        admin = registry.create_admin_key(actor="bench")[1]
    key = keys[TENANT]
    server = Server(home, str(model_dir), dtype, max_loras)
    server.start()
    try:
        with httpx.Client(base_url=server.url) as http:
            warm_up(http, keys[WARMUP])
            published = []
            for i in range(num_versions):
                adapter_dir = write_random_adapter(root / f"v{i + 2}", config, rank, seed=i + 2)
                publish(http, admin, adapter_dir, promote_with_call=i % 2 == 1)
                latency(http, keys[WARMUP], 200 + i)  # another tenant in between, as in life
                published.append(first_request(http, key, admin, 10 * i))
    finally:
        server.stop()
    restarted = []
    for i in range(restarts):
        server.start()
        try:
            with httpx.Client(base_url=server.url) as http:
                warm_up(http, keys[WARMUP])  # pre-warm at start runs meanwhile
                restarted.append(first_request(http, key, admin, 1000 + 10 * i))
        finally:
            server.stop()
    return {"model": model, "rank": rank, "dtype": dtype, "max_loras": max_loras,
            "published": summary(published), "after_restart": summary(restarted),
            "rounds": {"published": published, "after_restart": restarted},
            "target_ms": {"p50": TARGET_P50_MS, "p99": TARGET_P99_MS}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--versions", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--max-loras", type=int, default=None,
                        help="serve's slots (default: its own); 1 makes every first request "
                             "copy its adapter into the slot the other tenant used")
    parser.add_argument("--dtype", default="float32")
    options = parser.parse_args(argv)
    slots = 1 if options.max_loras is None else options.max_loras
    if min(options.versions, options.rank, options.restarts, slots) < 1:
        parser.error("--versions, --rank, --restarts and --max-loras must be at least 1")
    with tempfile.TemporaryDirectory(prefix="loraplex-first-request-") as tmp:
        result = run(options.model, options.versions, options.rank, options.dtype, Path(tmp),
                     options.restarts, options.max_loras)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

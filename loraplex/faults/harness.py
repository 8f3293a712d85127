"""What every fault run shares: a home with tenants and adapters on the tiny model
(tiny_model.py), and a real `loraplex serve` process to throw things at (started, killed,
restarted).

Each tenant's adapter `bot` has two random versions, v1 serving; B is scaled up so that the two
versions' answers differ (what makes a mis-attributed answer detectable).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loraplex.bench.adapters import write_random_adapter
from loraplex.bench.fairness import free_port, stop_server, wait_ready
from loraplex.faults.tiny_model import write_tiny_model
from loraplex.home import ADAPTER_CACHE_DIR, ADAPTER_CACHE_ENV, HOME_ENV
from loraplex.kernels.cpu import CACHE_DIR as KERNEL_CACHE_DIR
from loraplex.kernels.cpu import CACHE_ENV as KERNEL_CACHE_ENV
from loraplex.model.loader import read_config
from loraplex.registry import Registry
from loraplex.vault.artifacts import ArtifactSealer

READY_TIMEOUT_S = 120
ADAPTER = "bot"
ADAPTER_RANK = 8
ADAPTER_B_SCALE = 0.5  # large enough that v1 and v2 answer differently


@dataclass
class FaultHome:
    """A loraplex home with tenants t00, t01, ... each with adapter `bot` v1 (serving), v2."""

    home: Path
    model_dir: Path
    keys: dict[str, str]  # tenant -> its key
    admin_key: str
    adapter_dirs: dict[tuple[str, int], Path] = field(default_factory=dict)  # (tenant, n)

    @property
    def tenants(self) -> list[str]:
        return list(self.keys)


def make_home(root: Path, num_tenants: int, model_dir: Path | None = None) -> FaultHome:
    """A fresh home under `root` (the model is built there too unless given)."""
    home = root / "home"
    home.mkdir(parents=True)
    model_dir = model_dir or write_tiny_model(root / "model")
    config = read_config(model_dir)
    sealer = ArtifactSealer.for_home(home)
    keys, dirs = {}, {}
    with Registry(home) as registry:
        for i in range(num_tenants):
            tenant = f"t{i:02d}"
            registry.create_tenant(tenant, actor="faults")
            for number in (1, 2):
                src = write_random_adapter(root / "src" / f"{tenant}-v{number}", config,
                                           ADAPTER_RANK, seed=100 * i + number,
                                           b_scale=ADAPTER_B_SCALE)
                registry.push_version(tenant, ADAPTER, src, actor="faults", validate=None,
                                      sealer=sealer)
                dirs[(tenant, number)] = src
            keys[tenant] = registry.create_key(tenant, actor="faults")[1]
        admin_key = registry.create_admin_key(actor="faults")[1]
    return FaultHome(home, model_dir, keys, admin_key, dirs)


class ServeProcess:
    """`loraplex serve` in a process of its own on a free port; its stderr goes to a log in
    the home (read it when a run fails)."""

    def __init__(self, fault_home: FaultHome, *args: str):
        self.fault_home = fault_home
        self.args = args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = fault_home.home / "serve.log"
        self.process: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        home = self.fault_home.home
        # The serving cache is the run's own (corruption alters it); the CPU kernels are built
        # once, in the user's home, not once per run (a minute on 2 cores).
        kernels = os.environ.get(KERNEL_CACHE_ENV) or str(
            Path.home() / ".loraplex" / KERNEL_CACHE_DIR)
        return {**os.environ, HOME_ENV: str(home), KERNEL_CACHE_ENV: kernels,
                ADAPTER_CACHE_ENV: str(home / ADAPTER_CACHE_DIR)}

    def start(self) -> ServeProcess:
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "loraplex.cli", "serve", "--model",
                 str(self.fault_home.model_dir), "--port", str(self.port),
                 "--max-model-len", "256", *self.args],
                env=self.env(), stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_ready(self.process, self.port, READY_TIMEOUT_S)
        except RuntimeError as e:
            raise RuntimeError(f"{e}:\n{self.log.read_text()[-3000:]}") from None
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """Ctrl-C, as an operator stops it; killed if it hangs."""
        if self.process is not None and self.process.poll() is None:
            stop_server(self.process)

    def rss_bytes(self) -> int:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def admin_headers(fault_home: FaultHome) -> dict[str, str]:
    return {"Authorization": f"Bearer {fault_home.admin_key}"}


def engine_stats(url: str, fault_home: FaultHome) -> dict:
    return httpx.get(f"{url}/admin/engine", headers=admin_headers(fault_home), timeout=30).json()


def is_idle(stats: dict) -> bool:
    """No request running or waiting, every KV block free (the prefix cache's unheld blocks
    count as free), no adapter load pending."""
    return (stats["running"] == 0 and stats["waiting"] == 0
            and stats["kv_blocks_free"] == stats["kv_blocks_total"]
            and stats["adapters_loading"] == 0)


def wait_idle(url: str, fault_home: FaultHome, timeout_s: float = 15) -> dict:
    """The engine's stats once idle (disconnected clients are noticed within a poll), or the
    last ones seen when it is not idle in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine_stats(url, fault_home)
        if is_idle(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)

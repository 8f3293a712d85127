"""Crash: SIGKILL the server while it streams an answer, stores a pushed adapter, promotes,
trains, stores an uploaded dataset and (in a CLI process of its own) exports a GGUF; restart;
the home must be sound (checks.py), every job must end failed with a reason (or resume), and
every tenant must be served again.

A round starts the server and keeps each operation going in a loop of its own (push, promote /
rollback, dataset upload, GGUF export; one streamed answer and one fine-tuning job), waits until
the job trains and every loop has finished one operation, lets them run a random moment more,
then kills the server and the export with SIGKILL: each loop has one operation in flight, at a
different point each round. Training workers must die with the server (they would otherwise
register a version for a job the restarted server calls failed).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

from loraplex.bench.adapters import write_random_adapter
from loraplex.faults.checks import home_problems
from loraplex.faults.harness import ADAPTER, FaultHome, ServeProcess, admin_headers, make_home
from loraplex.model.loader import read_config
from loraplex.registry.artifacts import ADAPTER_FILES

KINDS = ("stream", "push", "promote", "training", "upload", "export")
TRAINING_TENANT, PUSH_TENANT, PROMOTE_TENANT, UPLOAD_TENANT, EXPORT_TENANT = (
    "t00", "t01", "t02", "t03", "t04")
WORKER_EXIT_S = 20  # a training worker must be gone this soon after its server


@dataclass
class CrashReport:
    rounds: int
    kills: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    problems: list[str] = field(default_factory=list)
    unreferenced_artifacts: int = 0
    jobs_failed_with_reason: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems and all(self.kills[k] == self.rounds for k in KINDS)

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _jsonl(num_records: int, seed: int) -> bytes:
    return b"".join(json.dumps({"messages": [
        {"role": "user", "content": f"question {seed}-{i}: when do you open?"},
        {"role": "assistant", "content": "We open at nine. " * 8}]}).encode() + b"\n"
        for i in range(num_records))


class Loop(threading.Thread):
    """Repeats one operation until stopped; counts the ones that finished."""

    def __init__(self, operation):
        super().__init__(daemon=True)
        self.operation, self.done, self.stop = operation, 0, threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                self.operation(i)
            except (httpx.HTTPError, OSError):
                return  # the server is gone: the kill
            except Exception as e:  # a real failure while the server was up
                self.error = f"{type(e).__name__}: {e}"
                return
            self.done += 1
            i += 1


def _expect(response: httpx.Response, what: str) -> None:
    if response.status_code not in (200, 201, 202):
        raise RuntimeError(f"{what}: {response.status_code} {response.text[:300]}")


class Operations:
    """The round's operations against one server (sync clients: each loop is a thread)."""

    def __init__(self, fh: FaultHome, server: ServeProcess, root: Path, rng: random.Random):
        self.fh, self.server, self.root, self.rng = fh, server, root, rng
        self.url, self.admin = server.url, admin_headers(fh)
        self.client = httpx.Client(timeout=60)
        config = read_config(fh.model_dir)
        self.pushable = [write_random_adapter(root / "push" / f"a{i}", config, 16, seed=900 + i)
                         for i in range(8)]
        self.export_process: subprocess.Popen | None = None

    def push(self, i: int) -> None:
        src = self.pushable[self.rng.randrange(len(self.pushable))]
        files = {name: (name, (src / name).read_bytes()) for name in ADAPTER_FILES}
        _expect(self.client.post(
            f"{self.url}/admin/tenants/{PUSH_TENANT}/adapters/pushed/versions", files=files,
            headers=self.admin), "push")

    def promote(self, i: int) -> None:
        base = f"{self.url}/admin/tenants/{PROMOTE_TENANT}/adapters/{ADAPTER}"
        response = (self.client.post(f"{base}/promote", json={"version": 2}, headers=self.admin)
                    if i % 2 == 0 else self.client.post(f"{base}/rollback", headers=self.admin))
        _expect(response, "promote")

    def upload(self, i: int) -> None:
        _expect(self.client.post(f"{self.url}/tenants/{UPLOAD_TENANT}/datasets/faq",
                                 content=_jsonl(400, i), headers=self.admin), "upload")

    def export(self, i: int) -> None:
        out = self.root / "exports" / f"{EXPORT_TENANT}.gguf"
        out.parent.mkdir(exist_ok=True)
        self.export_process = subprocess.Popen(
            [sys.executable, "-m", "loraplex.cli", "export", "gguf", EXPORT_TENANT, ADAPTER,
             "--out", str(out), "--model", str(self.fh.model_dir), "--dtype", "f32", "--force"],
            env=self.server.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, stderr = self.export_process.communicate()
        if self.export_process.returncode not in (0, -9):
            raise RuntimeError(f"export: {stderr[-500:]}")

    def start_training(self) -> str:
        key = {"Authorization": f"Bearer {self.fh.keys[TRAINING_TENANT]}"}
        upload = self.client.post(f"{self.url}/v1/files", headers=key,
                                  data={"purpose": "fine-tune"},
                                  files={"file": ("train.jsonl", _jsonl(64, 0))})
        _expect(upload, "training file")
        job = self.client.post(f"{self.url}/v1/fine_tuning/jobs", headers=key, json={
            "model": self.fh.model_dir.name, "training_file": upload.json()["id"],
            "suffix": "trained", "hyperparameters": {"n_epochs": 50, "batch_size": 1}})
        _expect(job, "fine-tuning job")
        return job.json()["id"]

    def job(self, job_id: str) -> dict:
        key = {"Authorization": f"Bearer {self.fh.keys[TRAINING_TENANT]}"}
        return self.client.get(f"{self.url}/v1/fine_tuning/jobs/{job_id}", headers=key).json()

    def stream_started(self) -> httpx.Response:
        """A long streamed answer, its first chunk read (so it is mid-answer at the kill)."""
        request = self.client.build_request(
            "POST", f"{self.url}/v1/completions", headers={
                "Authorization": f"Bearer {self.fh.keys[PUSH_TENANT]}"},
            json={"model": ADAPTER, "prompt": "Hi", "max_tokens": 200, "ignore_eos": True,
                  "stream": True})
        response = self.client.send(request, stream=True)
        next(response.iter_lines())
        return response


def _round(fh: FaultHome, root: Path, rng: random.Random, report: CrashReport) -> str:
    """One kill; returns the id of the fine-tuning job that was training at it."""
    server = ServeProcess(fh).start()
    ops = Operations(fh, server, root, rng)
    job_id = ops.start_training()
    loops = {kind: Loop(getattr(ops, kind)) for kind in ("push", "promote", "upload", "export")}
    for loop in loops.values():
        loop.start()
    deadline = time.monotonic() + 300
    while ops.job(job_id).get("status") != "running" or any(
            loop.done == 0 and loop.error is None for loop in loops.values()):
        if time.monotonic() > deadline:
            raise RuntimeError("the round's operations never all got going")
        time.sleep(0.2)
    stream = ops.stream_started()
    time.sleep(rng.uniform(0, 0.5))
    workers = psutil.Process(server.process.pid).children(recursive=True)
    export = ops.export_process
    server.kill()
    if export is not None and export.poll() is None:
        export.kill()
        report.kills["export"] += 1
    report.kills["stream"] += 1
    report.kills["training"] += 1
    for kind in ("push", "promote", "upload"):
        report.kills[kind] += 1
    for loop in loops.values():
        loop.stop.set()
        loop.join(timeout=30)
        if loop.error:
            report.problems.append(f"{loop.name}: {loop.error}")
    stream.close()
    ops.client.close()
    _, alive = psutil.wait_procs(workers, timeout=WORKER_EXIT_S)
    for process in alive:
        report.problems.append(f"process {process.pid} outlived its server: {process.cmdline()}")
        process.kill()
    return job_id


def _after_restart(fh: FaultHome, root: Path, job_id: str, report: CrashReport) -> None:
    """Restart, then check the home, the job, partial exports and serving."""
    with ServeProcess(fh) as server:
        ops = Operations(fh, server, root, random.Random(0))
        job = ops.job(job_id)
        error = job.get("error") or {}
        if job.get("status") == "failed" and error.get("code"):
            report.jobs_failed_with_reason += 1
        elif job.get("status") not in ("queued", "running", "validating_files"):
            report.problems.append(f"job {job_id} after restart: {job}")
        for tenant, key in fh.keys.items():
            response = ops.client.post(f"{server.url}/v1/completions", json={
                "model": ADAPTER, "prompt": "Hi", "max_tokens": 2},
                headers={"Authorization": f"Bearer {key}"})
            if response.status_code != 200:
                report.problems.append(f"{tenant} not served after restart: {response.text}")
        ops.client.close()
    found = home_problems(fh.home)
    report.problems += found["problems"]
    report.unreferenced_artifacts = found["unreferenced_artifacts"]
    report.problems += [f"{p}: a partial export left behind"
                        for p in (root / "exports").glob(".*.partial")]


def run_crash(root: Path, *, rounds: int = 3, seed: int = 0,
              model_dir: Path | None = None) -> CrashReport:
    started, rng = time.monotonic(), random.Random(seed)
    fh = make_home(root, 5, model_dir)
    report = CrashReport(rounds)
    for _ in range(rounds):
        job_id = _round(fh, root, rng, report)
        _after_restart(fh, root, job_id, report)
    report.seconds = round(time.monotonic() - started, 1)
    return report

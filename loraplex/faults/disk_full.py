"""Disk full: the home on a small filesystem (a tmpfs of SMALL_FS_MIB), filled to the last byte
while the server runs; every write must be refused clearly, leave nothing half-written, and
not stop serving; once there is room again, the same operations must work.

A round:
1. Before filling: a greedy answer from the serving tenant (the reference), the usage billed
   so far. Both SQLite files' WALs are checkpointed and truncated, so that their next commit
   needs new pages (a WAL keeps its size after a checkpoint, and a commit that fits in it would
   succeed on a full disk: the run would then not know what it tested).
2. The filler file is written until ENOSPC (topped up before each operation, in case a refused
   write freed a page). Then, against the full disk: a push (an adapter upload over the admin
   API), a dataset upload, a training job (trains in RAM, then cannot store its version), a GGUF
   export (`loraplex export gguf` in a process of its own, the file going into the home), and
   the ledger's writes (chat completions that must still answer 200, the same answer as the
   reference, while their usage rows wait in memory). Each must be refused clearly: a 507 with
   code `insufficient_storage` in OpenAI's error shape, a job failed with a reason naming the
   full disk, an export that exits non-zero saying so, the ledger not committing.
3. The home is checked (checks.py) and searched for temp or partial files: none may be left.
4. The filler is removed; each operation again must succeed, the ledger must bill every answer
   given while the disk was full, and the home must still be sound.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from loraplex.bench.adapters import write_random_adapter
from loraplex.faults.checks import home_problems
from loraplex.faults.crash import _jsonl
from loraplex.faults.harness import ADAPTER, FaultHome, ServeProcess, admin_headers, make_home
from loraplex.faults.tiny_model import write_tiny_model
from loraplex.home import EXPORTS_DIR
from loraplex.model.loader import read_config
from loraplex.registry.artifacts import ADAPTER_FILES
from loraplex.registry.db import DB_FILE
from loraplex.storage import CODE as STORAGE_FULL_CODE
from loraplex.vault.store import INDEX_FILE, VAULT_DIR

KINDS = ("push", "upload", "training", "export", "ledger")
SMALL_FS_MIB = 16  # room for the home of two tenants, a few pushes and exports
ANSWERS_WHILE_FULL = 3  # chat completions per round while the disk is full
TENANT = "t00"  # the tenant whose operations hit the full disk
DATASET = "faq"
TRAINING_S = 180  # a training job of two steps on the tiny model must finish this soon
REFUSED, OK = "refused", "ok"
# What a clear refusal says (StorageFull's message, the exporter's ExportError).
FULL_DISK_WORDS = ("disk holding the loraplex home is full", "no space left")
PARTIAL_SUFFIXES = (".tmp", ".partial")


class MountRefused(RuntimeError):
    """The small filesystem could not be mounted here (not root, or no mount permission)."""


@dataclass
class DiskFullReport:
    rounds: int
    tried: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    served_while_full: int = 0  # answers 200, identical to the reference, while full
    succeeded_after_freeing: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(KINDS, 0))
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        every_round = dict.fromkeys(KINDS, self.rounds)
        return (not self.problems and self.tried == every_round and self.refused == every_round
                and self.succeeded_after_freeing == every_round
                and self.served_while_full == self.rounds * ANSWERS_WHILE_FULL)

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


@contextmanager
def small_filesystem(path: Path, size_mib: int) -> Iterator[Path]:
    """A tmpfs of `size_mib` mounted at `path` (made here), unmounted on exit."""
    path.mkdir(parents=True)
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700",
                                 "tmpfs", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise MountRefused("no `mount` command on this machine") from None
    if result.returncode != 0:
        raise MountRefused(f"cannot mount a tmpfs at {path} (root is needed): "
                           f"{result.stderr.strip()}")
    try:
        yield path
    finally:
        # A process that just exited (the server's training worker) may still hold a file
        # there: then detached now and freed once it is gone (lazy), never left mounted.
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill(filler: Path) -> None:
    """Append to `filler` until the filesystem has no byte left (1 MiB writes, then pages)."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (b"\0" * (1 << 20), b"\0" * 4096, b"\0"):
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)


def truncate_wal(db: Path) -> None:
    """Checkpoint the database and truncate its WAL to zero bytes (the server must be idle)."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()
    if busy:
        raise RuntimeError(f"{db}: the WAL could not be truncated (a reader held it)")


def partial_files(root: Path) -> list[str]:
    """Temp and partial files anywhere under `root` (the push temp dir is checks.py's)."""
    return [f"{path}: a temp or partial file left behind" for path in sorted(root.rglob("*"))
            if path.is_file() and path.name.endswith(PARTIAL_SUFFIXES)]


def _refusal(response: httpx.Response) -> str:
    """OK for a success, REFUSED for a 507 insufficient_storage, else what came back."""
    if response.status_code in (200, 201, 202):
        return OK
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    if response.status_code == 507 and code == STORAGE_FULL_CODE:
        return REFUSED
    return f"{response.status_code} {response.text[:300]}"


def _names_full_disk(text: str) -> bool:
    return any(words in text.lower() for words in FULL_DISK_WORDS)


class Operations:
    """The operations that write to the home, each returning OK, REFUSED or what went wrong."""

    def __init__(self, fh: FaultHome, server: ServeProcess, root: Path):
        self.fh, self.server, self.root = fh, server, root
        self.url, self.admin = server.url, admin_headers(fh)
        self.client = httpx.Client(timeout=120)
        self.config = read_config(fh.model_dir)
        self.num_pushes = 0

    def push(self) -> str:
        # New content each time: a push of content already stored would write no file.
        self.num_pushes += 1
        src = write_random_adapter(self.root / "push" / f"a{self.num_pushes}", self.config, 4,
                                   seed=1000 + self.num_pushes)
        files = {name: (name, (src / name).read_bytes()) for name in ADAPTER_FILES}
        return _refusal(self.client.post(
            f"{self.url}/admin/tenants/{TENANT}/adapters/pushed/versions", files=files,
            headers=self.admin))

    def upload(self) -> str:
        return _refusal(self.client.post(f"{self.url}/tenants/{TENANT}/datasets/{DATASET}",
                                         content=_jsonl(32, self.num_pushes),
                                         headers=self.admin))

    def training(self) -> str:
        """A job that trains two steps; its start refused (507), or it ends failed or not."""
        before = set(self._jobs())
        started = self.client.post(f"{self.url}/tenants/{TENANT}/training-jobs", json={
            "dataset": DATASET, "adapter": "trained", "rank": 4, "max_steps": 2,
            "batch_size": 2, "eval_fraction": 0}, headers=self.admin)
        if started.status_code != 202:
            outcome = _refusal(started)
            # A refused start must queue nothing: a job left running would be one its client
            # was told does not exist (it may show up cancelled).
            for job_id, job in self._finished_jobs().items():
                if job_id not in before and job["state"] != "cancelled":
                    return f"{outcome}, yet job {job_id} ran: {job['state']} {job['error']}"
            return outcome
        job = self._finished_jobs()[started.json()["id"]]
        if job["state"] == "succeeded":
            return OK
        if job["state"] == "failed" and _names_full_disk(job["error"] or ""):
            return REFUSED
        return f"job {job['id']} {job['state']}: {job['error']}"

    def _jobs(self) -> dict[str, dict]:
        jobs = self.client.get(f"{self.url}/tenants/{TENANT}/training-jobs",
                               headers=self.admin).json()["jobs"]
        return {job["id"]: job for job in jobs}

    def _finished_jobs(self) -> dict[str, dict]:
        """The tenant's jobs once none is queued or running (RuntimeError after TRAINING_S)."""
        deadline = time.monotonic() + TRAINING_S
        while True:
            jobs = self._jobs()
            if all(job["state"] in ("succeeded", "failed", "cancelled") for job in jobs.values()):
                return jobs
            if time.monotonic() > deadline:
                raise RuntimeError(f"training jobs still unfinished after {TRAINING_S} s: {jobs}")
            time.sleep(0.5)

    def export(self) -> str:
        out = self.fh.home / EXPORTS_DIR / TENANT / "bot.gguf"
        done = subprocess.run(
            [sys.executable, "-m", "loraplex.cli", "export", "gguf", TENANT, ADAPTER,
             "--out", str(out), "--model", str(self.fh.model_dir), "--dtype", "f32", "--force"],
            env=self.server.env(), capture_output=True, text=True)
        if done.returncode == 0:
            return OK
        if _names_full_disk(done.stderr):
            return REFUSED
        return f"exit {done.returncode}: {done.stderr[-500:]}"

    def answer(self) -> httpx.Response:
        """A greedy chat completion of the tenant's serving adapter."""
        return self.client.post(f"{self.url}/v1/chat/completions", json={
            "model": ADAPTER, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8, "temperature": 0, "ignore_eos": True},
            headers={"Authorization": f"Bearer {self.fh.keys[TENANT]}"})

    def billed_requests(self) -> int:
        """The tenant's requests in the ledger (GET /admin/usage commits what is pending)."""
        usage = self.client.get(f"{self.url}/admin/usage", params={"tenant": TENANT},
                                headers=self.admin).json()
        return sum(row["requests"] for row in usage["data"])


def _while_full(ops: Operations, filler: Path, reference: str, billed: int,
                report: DiskFullReport) -> None:
    for kind in KINDS[:-1]:
        fill(filler)
        report.tried[kind] += 1
        outcome = getattr(ops, kind)()
        if outcome == REFUSED:
            report.refused[kind] += 1
        else:
            report.problems.append(f"{kind} on a full disk: {outcome}")
    fill(filler)
    report.tried["ledger"] += 1
    for _ in range(ANSWERS_WHILE_FULL):
        response = ops.answer()
        if response.status_code != 200:
            report.problems.append(f"not served on a full disk: {response.status_code} "
                                   f"{response.text[:300]}")
        elif response.json()["choices"][0]["message"]["content"] != reference:
            report.problems.append("a different answer on a full disk")
        else:
            report.served_while_full += 1
    if ops.billed_requests() == billed:
        report.refused["ledger"] += 1  # the commit failed; the rows wait in memory
    else:
        report.problems.append("the ledger committed on a full disk (the run tested nothing)")


def _after_freeing(ops: Operations, billed: int, report: DiskFullReport) -> None:
    for kind in KINDS[:-1]:
        outcome = getattr(ops, kind)()
        if outcome == OK:
            report.succeeded_after_freeing[kind] += 1
        else:
            report.problems.append(f"{kind} after freeing the disk: {outcome}")
    now_billed = ops.billed_requests()
    if now_billed == billed + ANSWERS_WHILE_FULL:
        report.succeeded_after_freeing["ledger"] += 1
    else:
        report.problems.append(f"the ledger billed {now_billed - billed} of the "
                               f"{ANSWERS_WHILE_FULL} answers given on a full disk")


def _round(ops: Operations, fh: FaultHome, filler: Path, report: DiskFullReport) -> None:
    reference = ops.answer().json()["choices"][0]["message"]["content"]
    billed = ops.billed_requests()
    truncate_wal(fh.home / DB_FILE)
    truncate_wal(fh.home / VAULT_DIR / INDEX_FILE)
    try:
        _while_full(ops, filler, reference, billed, report)
        report.problems += home_problems(fh.home)["problems"]
        report.problems += partial_files(filler.parent)
    finally:
        filler.unlink()
    _after_freeing(ops, billed, report)
    report.problems += home_problems(fh.home)["problems"]
    report.problems += partial_files(filler.parent)


def run_disk_full(root: Path, *, rounds: int = 3, model_dir: Path | None = None
                  ) -> DiskFullReport:
    """MountRefused where no tmpfs can be mounted (the run needs root)."""
    started = time.monotonic()
    # The model stays off the small filesystem: only the home is on it.
    model_dir = model_dir or write_tiny_model(root / "model")
    report = DiskFullReport(rounds)
    with small_filesystem(root / "small", SMALL_FS_MIB) as small:
        fh = make_home(small, 2, model_dir)
        server = ServeProcess(fh)
        server.log = root / "serve.log"  # off the small filesystem: it must keep its lines
        with server:
            ops = Operations(fh, server, root)
            if ops.upload() != OK:  # the dataset every round's training job reads
                raise RuntimeError("the first dataset upload failed")
            for _ in range(rounds):
                _round(ops, fh, small / "filler", report)
            ops.client.close()
    report.seconds = round(time.monotonic() - started, 1)
    return report

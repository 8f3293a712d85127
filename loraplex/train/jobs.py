"""Training jobs in the background, for the HTTP API: a queue, one worker process per job.

Jobs run one at a time by default (`max_running`): training takes every core it is given, and
two at once on a small machine would each run at half speed while also slowing serving. The
queue is fair across tenants: the next job is the oldest one of the tenant whose last job
started longest ago, so a tenant's second job waits behind other tenants' first. Each
job is a `python -m loraplex.train.worker` process; its JSON lines update the job's state here.
Job states live in this process's memory: a server restart forgets finished jobs (their
versions and training records are in the registry) and stops running ones, which then leave
nothing behind (see trainer.py).
"""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued", "running", "succeeded", "failed", "cancelled")
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
MAX_KEPT_FINISHED = 1000  # finished jobs remembered for status queries; the oldest go first


class JobNotFound(LookupError):
    pass


@dataclass
class TrainingJob:
    """One job as a client sees it."""

    id: str
    tenant: str
    adapter: str
    dataset: str
    options: dict  # the train_adapter keyword arguments besides tenant, dataset and adapter
    created_by: str
    state: str = QUEUED
    phase: str | None = None  # loading, evaluating, training, registering (while running)
    step: int = 0
    num_steps: int | None = None
    loss: float | None = None  # the last training step's
    version: str | None = None  # "v3" once succeeded
    trained_tokens: int | None = None  # once succeeded
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None

    def as_json(self) -> dict:
        data = asdict(self)
        data["progress"] = round(self.step / self.num_steps, 4) if self.num_steps else 0.0
        return data


# listener(job, event): the worker's events ("progress", "checkpoint") as it sends them, then
# {"event": "running"} when a job starts and {"event": "finished"} once its state is final.
# Called on a training thread, never with the queue's lock held.
Listener = Callable[[TrainingJob, dict], None]


class TrainingJobs:
    """Start, list, inspect and cancel training jobs; `close()` stops the running one."""

    def __init__(self, home: Path, model: str, *, max_running: int = 1):
        self.home = Path(home)
        self.model = model  # the server's base model: adapters are trained for what it serves
        self._jobs: dict[str, TrainingJob] = {}
        self._queue: list[str] = []  # in arrival order; _next_job() chooses among them
        self._listeners: dict[str, Listener] = {}
        self._last_started: dict[str, int] = {}  # tenant -> how many jobs had started then
        self._num_started = 0
        self._processes: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._workers = [threading.Thread(target=self._run_jobs, name=f"training-{i}",
                                          daemon=True) for i in range(max_running)]
        for worker in self._workers:
            worker.start()

    def start(self, tenant: str, *, dataset: str, adapter: str, actor: str,
              job_id: str | None = None, listener: Listener | None = None, **options
              ) -> TrainingJob:
        job = TrainingJob(id=job_id or f"train-{uuid.uuid4().hex[:12]}", tenant=tenant,
                          adapter=adapter, dataset=dataset, options=options, created_by=actor)
        with self._lock:
            if self._closed:
                raise RuntimeError("the training queue is shut down")
            self._jobs[job.id] = job
            self._queue.append(job.id)
            if listener is not None:
                self._listeners[job.id] = listener
            self._forget_old_jobs()
            self._wake.notify()
        return job

    @property
    def is_closed(self) -> bool:
        return self._closed

    def get(self, job_id: str, tenant: str | None = None) -> TrainingJob:
        """The job; JobNotFound also when it belongs to another tenant than `tenant`."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or (tenant is not None and job.tenant != tenant):
            raise JobNotFound(f"no training job {job_id!r}")
        return job

    def list(self, tenant: str | None = None) -> list[TrainingJob]:
        with self._lock:
            jobs = list(self._jobs.values())
        return [job for job in jobs if tenant is None or job.tenant == tenant]

    def cancel(self, job_id: str, tenant: str | None = None) -> TrainingJob:
        """Cancel a queued or running job (a finished one is left as it is)."""
        job = self.get(job_id, tenant)
        with self._lock:
            was_queued = job.state == QUEUED
            if was_queued:
                self._queue.remove(job.id)
                self._finish(job, CANCELLED, error="cancelled before it started")
            process = self._processes.get(job.id)
        if was_queued:
            self._notify(job, {"event": "finished"})
        if process is not None:
            process.send_signal(signal.SIGTERM)  # the trainer unwinds and registers nothing
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> TrainingJob:
        """Block until the job has finished (for tests and scripts)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._jobs[job_id].state not in FINISHED:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"training job {job_id} still {self._jobs[job_id].state}")
                self._wake.wait(left)
            return self._jobs[job_id]

    def close(self) -> None:
        """Cancel queued jobs and stop running ones (their worker processes get SIGTERM)."""
        with self._lock:
            self._closed = True
            dropped = [self._jobs[job_id] for job_id in self._queue]
            for job in dropped:
                self._finish(job, CANCELLED, error="the server shut down")
            self._queue.clear()
            processes = list(self._processes.values())
            self._wake.notify_all()
        for job in dropped:
            self._notify(job, {"event": "finished"})
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for worker in self._workers:
            worker.join(timeout=30)

    # -- the worker threads ----------------------------------------------------------------
    def _run_jobs(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                job = self._next_job()
                job.state, job.started_at = RUNNING, time.time()
                process = self._spawn(job)
                self._processes[job.id] = process
            self._notify(job, {"event": "running"})
            try:
                self._follow(job, process)
            finally:
                with self._lock:
                    self._processes.pop(job.id, None)
                self._notify(job, {"event": "finished"})

    def _next_job(self) -> TrainingJob:
        """Take the queue's next job: the oldest of the tenant served longest ago (a tenant
        never served first). Call with the lock held and the queue not empty."""
        def turn(index: int) -> tuple[int, int]:
            return self._last_started.get(self._jobs[self._queue[index]].tenant, -1), index

        job = self._jobs[self._queue.pop(min(range(len(self._queue)), key=turn))]
        self._last_started[job.tenant] = self._num_started
        self._num_started += 1
        return job

    def _notify(self, job: TrainingJob, event: dict) -> None:
        finished = event["event"] == "finished"  # the job's last event: forget its listener
        listener = (self._listeners.pop if finished else self._listeners.get)(job.id, None)
        if listener is not None:
            try:
                listener(job, event)
            except Exception:  # the listener's own failure must not stop the queue's thread
                log.exception("training job %s: its listener failed on %s", job.id, event)

    def _spawn(self, job: TrainingJob) -> subprocess.Popen:
        request = {"home": str(self.home), "tenant": job.tenant, "dataset": job.dataset,
                   "adapter": job.adapter, "actor": job.created_by, "model": self.model,
                   **job.options}
        process = subprocess.Popen(
            [sys.executable, "-m", "loraplex.train.worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=os.environ.copy())
        process.stdin.write(json.dumps(request))
        process.stdin.close()
        return process

    def _follow(self, job: TrainingJob, process: subprocess.Popen) -> None:
        """Apply the worker's events to the job until it exits."""
        outcome = None
        for line in process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # not ours (a library printing to stdout)
            with self._lock:
                if event.get("event") == "progress":
                    job.phase, job.step = event["phase"], event["step"]
                    job.num_steps, job.loss = event["num_steps"], event["loss"]
                    self._wake.notify_all()
                elif event.get("event") in ("done", "error"):
                    outcome = event
            if event.get("event") in ("progress", "checkpoint"):
                self._notify(job, event)
        code = process.wait()
        with self._lock:
            if outcome is not None and outcome["event"] == "done":
                job.version, job.trained_tokens = outcome["label"], outcome["trained_tokens"]
                self._finish(job, SUCCEEDED)
            # SIGTERM (cancel, shutdown) ends a worker by its own message or, before its signal
            # handler was set, by the signal itself.
            elif self._closed or code == -signal.SIGTERM or (
                    outcome and outcome["message"].startswith("cancelled")):
                self._finish(job, CANCELLED, error="cancelled: no version was created")
            else:
                message = outcome["message"] if outcome else f"the training process died ({code})"
                self._finish(job, FAILED, error=message)

    def _finish(self, job: TrainingJob, state: str, *, error: str | None = None) -> None:
        """Call with the lock held."""
        job.state, job.error, job.finished_at, job.phase = state, error, time.time(), None
        self._wake.notify_all()

    def _forget_old_jobs(self) -> None:
        """Call with the lock held."""
        finished = sorted((job for job in self._jobs.values() if job.state in FINISHED),
                          key=lambda job: job.created_at)
        for job in finished[:max(len(finished) - MAX_KEPT_FINISHED, 0)]:
            del self._jobs[job.id]

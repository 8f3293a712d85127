"""OpenAI's fine-tuning jobs on loraplex's own pieces: files are vault datasets, a job is a
training job of jobs.py (the same queue, fair across tenants, one job at a time), and its
result is the next version of one of the tenant's adapters.

A job's life, as the API shows it (`status`): validating_files (its files are decrypted and
checked off the request path) -> queued -> running -> succeeded | failed | cancelled. Jobs,
their events (newest first: messages and per-step metrics) and checkpoints (each epoch's end:
step, train loss, held-out loss) are kept in the registry, so they outlive a restart; a job
that was running when the server stopped is failed with a reason, one that was waiting is
queued again. The finished job's `fine_tuned_model` is "<adapter>:vN", a name that reaches
exactly that version in chat completions; the adapter's plain name reaches the version its
deployment serves (the new one when it is the adapter's first version, or when the tenant's
setting promotes fine-tuned versions).
"""

from __future__ import annotations

import copy
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from loraplex.registry import NotFound, Registry
from loraplex.registry.fine_tuning import FineTuningStore
from loraplex.registry.resolver import split_pinned
from loraplex.registry.tenants import Principal, check_name
from loraplex.storage import is_storage_full
from loraplex.train.jobs import CANCELLED, FAILED, SUCCEEDED, TrainingJob, TrainingJobs
from loraplex.vault import DatasetNotFound, Vault, VaultError
from loraplex.webhooks import WebhookSender

BASE_LEARNING_RATE = 2e-4  # what learning_rate_multiplier 1 means (train_adapter's default)
AUTO_EPOCHS = 3
MAX_AUTO_BATCH_SIZE = 8
UNFINISHED = ("validating_files", "queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")
FULL_DISK_RETRY_S = 1.0  # how often a finished job's outcome is saved again while the disk is full
log = logging.getLogger(__name__)


class FineTuningError(ValueError):
    """A request the API refuses: kind "invalid" (400), "not_found" (404) or "conflict"."""

    def __init__(self, kind: str, message: str, *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.kind, self.param, self.code = kind, param, code


@dataclass(frozen=True)
class JobRequest:
    """A create request, checked for types by the server; values are checked here."""

    model: str
    training_file: str
    validation_file: str | None = None
    n_epochs: int | str = "auto"
    batch_size: int | str = "auto"
    learning_rate_multiplier: float | str = "auto"
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None


class FineTuning:
    def __init__(self, registry: Registry, vault: Vault, jobs: TrainingJobs,
                 store: FineTuningStore, webhooks: WebhookSender, base_model_name: str):
        self.registry, self.vault, self.jobs = registry, vault, jobs
        self.store, self.webhooks, self.base_model_name = store, webhooks, base_model_name
        self._validator = ThreadPoolExecutor(1, thread_name_prefix="fine-tuning-validation")
        self._lock = threading.Lock()  # one writer of a job's body at a time
        self._recover()

    def close(self) -> None:
        self._validator.shutdown(wait=True, cancel_futures=True)

    # -- the API ---------------------------------------------------------------------------
    def create(self, principal: Principal, request: JobRequest, *, actor: str) -> dict:
        tenant = principal.tenant_name
        training = self._file(tenant, request.training_file, "training_file")
        if request.validation_file is not None:
            self._file(tenant, request.validation_file, "validation_file")
        adapter, init_adapter = self._start_point(tenant, request)
        job_id = f"ftjob-{secrets.token_hex(12)}"
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        job = {
            "id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()),
            "error": None, "fine_tuned_model": None, "finished_at": None,
            "hyperparameters": _resolve_hyperparameters(request, training.dataset.num_records),
            "model": request.model, "organization_id": tenant, "result_files": [],
            "seed": seed, "status": "validating_files", "trained_tokens": None,
            "training_file": request.training_file, "validation_file": request.validation_file,
            "estimated_finish": None, "integrations": [], "metadata": request.metadata,
            "method": {"type": "supervised", "supervised": {"hyperparameters": None}},
            "suffix": request.suffix,
            # loraplex's own fields: where the result goes, and what it continues from.
            "adapter": adapter, "continued_from": init_adapter and request.model,
        }
        job["method"]["supervised"]["hyperparameters"] = job["hyperparameters"]
        self.store.add_job(principal.tenant_id, job, actor=actor)
        self._event(job, f"Validating training file: {request.training_file}")
        created = copy.deepcopy(job)  # the answer: the validator thread goes on changing `job`
        self._validator.submit(self._validate_and_queue, principal.tenant_id, tenant, job,
                               init_adapter, actor)
        return created

    def get(self, tenant_id: int, job_id: str) -> dict:
        job = self.store.get_job(tenant_id, job_id)
        if job is None:
            raise FineTuningError("not_found", f"No fine-tuning job found with id {job_id!r}",
                                  param="fine_tuning_job_id")
        return job

    def cancel(self, principal: Principal, job_id: str, *, actor: str) -> dict:
        job = self.get(principal.tenant_id, job_id)
        if job["status"] in FINISHED:
            raise FineTuningError("invalid", f"the job is already {job['status']}",
                                  param="fine_tuning_job_id")
        self.registry.record_audit(actor, "fine_tuning.cancel", job_id, {},
                                   tenant=principal.tenant_name)
        try:
            self.jobs.cancel(job_id)  # the queue's listener records the outcome
        except LookupError:  # still validating its files: it never reached the queue
            self._finish(principal.tenant_id, job, "cancelled", None)
        return self.get(principal.tenant_id, job_id)

    # -- validation, then the queue ----------------------------------------------------------
    def _validate_and_queue(self, tenant_id: int, tenant: str, job: dict,
                            init_adapter: str | None, actor: str) -> None:
        for param in ("training_file", "validation_file"):
            if job[param] is None:
                continue
            try:
                self.vault.read(tenant, job[param], 1)  # decrypts, checks sha256, parses
            except VaultError as e:
                self._finish(tenant_id, job, "failed", {
                    "code": f"invalid_{param}", "message": str(e), "param": param})
                return
        with self._lock:
            if self.store.get_job(tenant_id, job["id"])["status"] != "validating_files":
                return  # cancelled meanwhile
            job["status"] = "queued"
            self.store.save_job(job)
        self._event(job, "Files validated, moving job to queued state")
        hyper = job["hyperparameters"]
        options = {"epochs": hyper["n_epochs"], "batch_size": hyper["batch_size"],
                   "lr": BASE_LEARNING_RATE * hyper["learning_rate_multiplier"],
                   "seed": job["seed"], "eval_fraction": 0.0,
                   "eval_dataset": job["validation_file"], "init_adapter": init_adapter,
                   "promote": self.store.promotes_new_versions(tenant_id)}
        self.jobs.start(tenant, dataset=job["training_file"], adapter=job["adapter"],
                        actor=actor, job_id=job["id"],
                        listener=lambda training, event: self._on_training(
                            tenant_id, job["id"], training, event), **options)

    def _on_training(self, tenant_id: int, job_id: str, training: TrainingJob, event: dict
                     ) -> None:
        """The queue's events for one job (on a training thread)."""
        job = self.store.get_job(tenant_id, job_id)
        kind = event["event"]
        if kind == "running":
            with self._lock:
                job["status"] = "running"
                self.store.save_job(job)
            self._event(job, "Fine-tuning job started")
        elif kind == "progress" and event["phase"] == "training":
            step, num_steps = event["step"], event["num_steps"]
            self._event(job, f"Step {step}/{num_steps}: training loss={event['loss']:.4f}",
                        "metrics", {"step": step, "total_steps": num_steps,
                                    "train_loss": event["loss"]})
            elapsed = time.time() - training.started_at
            with self._lock:
                job["estimated_finish"] = int(training.started_at + elapsed / step * num_steps)
                self.store.save_job(job)
        elif kind == "checkpoint":
            self._checkpoint(job, event)
        elif kind == "finished":
            # Its outcome must be saved (a job left "running" would wait for a restart): while
            # the disk is full, retried on this thread; no other job could store a version now.
            while True:
                try:
                    self._finished(tenant_id, job, training)
                    return
                except Exception as e:
                    if not is_storage_full(e) or self.jobs.is_closed:
                        raise
                    log.warning("fine-tuning job %s: cannot save its outcome yet: %s",
                                job["id"], e)
                    time.sleep(FULL_DISK_RETRY_S)
                    job = self.store.get_job(tenant_id, job_id)

    def _checkpoint(self, job: dict, event: dict) -> None:
        step = event["step"]
        self.store.add_checkpoint(job["id"], {
            "id": f"ftckpt-{secrets.token_hex(12)}", "object": "fine_tuning.job.checkpoint",
            "created_at": int(time.time()), "fine_tuning_job_id": job["id"],
            # Only the last checkpoint's weights are kept (as the job's model): earlier ones
            # are their metrics alone.
            "fine_tuned_model_checkpoint": None, "step_number": step,
            "metrics": {"step": step, "train_loss": event["train_loss"],
                        "valid_loss": event["eval_loss"],
                        "full_valid_loss": event["eval_loss"]}})
        self._event(job, f"Checkpoint created at step {step}")

    def _finished(self, tenant_id: int, job: dict, training: TrainingJob) -> None:
        if self.jobs.is_closed and training.state == CANCELLED:
            if job["status"] == "running":
                self._finish(tenant_id, job, "failed", {
                    "code": "server_restarted", "param": None, "message":
                    "the server shut down while the job was running; no model was created"})
            return  # a queued job stays queued: the next start queues it again
        if training.state == SUCCEEDED:
            job["fine_tuned_model"] = f"{training.adapter}:{training.version}"
            job["trained_tokens"] = training.trained_tokens
            self.store.set_last_checkpoint_model(job["id"], job["fine_tuned_model"])
            self._event(job, f"New fine-tuned model created: {job['fine_tuned_model']}")
            self._finish(tenant_id, job, "succeeded", None)
        elif training.state == CANCELLED:
            self._finish(tenant_id, job, "cancelled", None)
        elif training.state == FAILED:
            self._finish(tenant_id, job, "failed", {
                "code": "training_failed", "message": training.error, "param": None})

    def _finish(self, tenant_id: int, job: dict, status: str, error: dict | None) -> None:
        with self._lock:
            current = self.store.get_job(tenant_id, job["id"])
            if current["status"] in FINISHED:
                return  # cancelled while validating, then the validation ended: said once
            job.update(status=status, error=error, finished_at=int(time.time()))
            self.store.save_job(job)
        message = {"succeeded": "The job has successfully completed",
                   "cancelled": "The job was cancelled"}.get(status)
        self._event(job, message or f"The job failed: {error['message']}",
                    level="info" if message else "error")
        self.webhooks.publish(tenant_id, f"fine_tuning.job.{status}", {"id": job["id"]})

    # -- helpers ---------------------------------------------------------------------------
    def _file(self, tenant: str, file_id: str, param: str):
        try:
            found = self.vault.get_file(tenant, file_id)
        except DatasetNotFound:
            raise FineTuningError("invalid", f"invalid {param}: no such file {file_id!r}",
                                  param=param, code=f"invalid_{param}") from None
        if found.purpose != "fine-tune":
            raise FineTuningError("invalid", f"{param} {file_id!r} has purpose "
                                  f"{found.purpose!r}, not 'fine-tune'", param=param,
                                  code=f"invalid_{param}")
        return found

    def _start_point(self, tenant: str, request: JobRequest) -> tuple[str, str | None]:
        """(the adapter the result is a version of, the PEFT dir training continues from)."""
        if request.suffix is not None:
            try:
                check_name("suffix", request.suffix)
            except ValueError as e:
                raise FineTuningError("invalid", str(e), param="suffix") from None
        if request.model == self.base_model_name:
            return request.suffix or f"ft-{secrets.token_hex(6)}", None
        name, pinned = split_pinned(request.model)
        try:
            info = self.registry.show_adapter(tenant, name)
            number = pinned or info.active
            version = self.registry.get_version(tenant, name, number)
        except (NotFound, ValueError):
            raise FineTuningError("not_found", f"The model '{request.model}' does not exist "
                                  "or you do not have access to it.", param="model",
                                  code="model_not_found") from None
        return request.suffix or name, str(version.artifact_path)

    def _event(self, job: dict, message: str, kind: str = "message", data: dict | None = None,
               *, level: str = "info") -> None:
        try:
            self.store.add_event(job["id"], {
                "id": f"ftevent-{secrets.token_hex(12)}", "object": "fine_tuning.job.event",
                "created_at": int(time.time()), "level": level, "message": message,
                "data": data or {}, "type": kind})
        except Exception as e:
            if not is_storage_full(e):
                raise
            # An event is a log line: on a full disk it is lost, the job's state is not.
            log.warning("fine-tuning job %s: event %r not saved: %s", job["id"], message, e)

    def _recover(self) -> None:
        """After a restart: running jobs failed with a reason, waiting ones queued again."""
        for tenant_id, job in self.store.jobs_with_status(UNFINISHED):
            if job["status"] == "running":
                self._finish(tenant_id, job, "failed", {
                    "code": "server_restarted", "param": None, "message":
                    "the server stopped while the job was running; no model was created"})
                continue
            tenant = job["organization_id"]  # the tenant's name
            job["status"] = "validating_files"
            self.store.save_job(job)
            init = None if not job["continued_from"] else self._start_point(
                tenant, JobRequest(job["continued_from"], job["training_file"]))[1]
            self._validator.submit(self._validate_and_queue, tenant_id, tenant, job, init,
                                   "system:restart")


def _resolve_hyperparameters(request: JobRequest, num_records: int) -> dict:
    """The values a job trains with, "auto" replaced by loraplex's choice for this file."""
    auto_batch = max(1, min(MAX_AUTO_BATCH_SIZE, num_records // 10))
    values = {
        "n_epochs": AUTO_EPOCHS if request.n_epochs == "auto" else request.n_epochs,
        "batch_size": auto_batch if request.batch_size == "auto" else request.batch_size,
        "learning_rate_multiplier": 1.0 if request.learning_rate_multiplier == "auto"
        else request.learning_rate_multiplier,
    }
    # A multiplier up to 5,000 keeps the learning rate within train_adapter's bound of 1.
    bounds = {"n_epochs": (1, 50), "batch_size": (1, 256),
              "learning_rate_multiplier": (0, 1 / BASE_LEARNING_RATE)}
    for name, (low, high) in bounds.items():
        value = values[name]
        if not (low < value <= high if name == "learning_rate_multiplier"
                else low <= value <= high):
            raise FineTuningError("invalid", f"hyperparameters.{name} must be 'auto' or in "
                                  f"{'(' if low == 0 else '['}{low:g}, {high:g}], got {value!r}",
                                  param=f"hyperparameters.{name}", code=f"invalid_{name}")
    return values

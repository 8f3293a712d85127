"""GGUF exports in the background, for the console: one at a time, files kept under the home.

An export is minutes of CPU for a real model, so a click queues it and the page polls. Files go
to <home>/exports/<tenant>/<job id>/ (the GGUF and its Modelfile), where the console serves
them for download. Job states live in this process's memory, as training jobs' do: a restart
forgets them (the files stay; `loraplex export gguf` writes the same files from the CLI).
Exports are the tenant's model in clear, so the folder is private (0700) and crypto-shredding
the tenant deletes it (Vault.delete_tenant_vault); a job of a shredded tenant is forgotten.
"""

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.export.errors import ExportError
from loraplex.export.gguf import DTYPES
from loraplex.export.modelfile import modelfile_path
from loraplex.export.version import export_version
from loraplex.home import EXPORTS_DIR
from loraplex.model.pull import PullError, resolve_model
from loraplex.registry import Registry
from loraplex.vault.artifacts import ArtifactSealer

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
log = logging.getLogger(__name__)


class ExportNotFound(LookupError):
    pass


@dataclass
class ExportJob:
    id: str
    tenant: str
    adapter: str
    version: str  # "v3"
    dtype: str
    adapter_only: bool
    created_by: str
    state: str = QUEUED
    error: str | None = None
    gguf_name: str | None = None  # once succeeded: the file's name in the job's folder
    num_bytes: int | None = None
    seconds: float | None = None
    created_at: float = field(default_factory=time.time)

    @property
    def is_finished(self) -> bool:
        return self.state in (SUCCEEDED, FAILED)


class ExportJobs:
    def __init__(self, registry: Registry, sealer: ArtifactSealer, model: str):
        """`model`: the served model (a default model's name or a checkpoint dir)."""
        self.registry, self.sealer, self.model = registry, sealer, model
        self.dir = registry.home / EXPORTS_DIR
        self._jobs: dict[str, ExportJob] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="loraplex-export")

    def start(self, tenant: str, adapter: str, number: int, dtype: str, *, adapter_only: bool,
              actor: str) -> ExportJob:
        """Queue an export of a version that exists (NotFound, ExportError now, not later)."""
        if dtype not in DTYPES:
            raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        version = self.registry.get_version(tenant, adapter, number)
        job = ExportJob(f"export-{uuid.uuid4().hex[:12]}", tenant, adapter, version.label,
                        dtype, adapter_only, actor)
        with self._lock:
            self._jobs[job.id] = job
        self._pool.submit(self._run, job, version)
        return job

    def list(self, tenant: str) -> list[ExportJob]:
        with self._lock:
            return [job for job in self._jobs.values() if job.tenant == tenant]

    def get(self, job_id: str, tenant: str) -> ExportJob:
        """The job; ExportNotFound also when it is another tenant's."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.tenant != tenant:
            raise ExportNotFound(f"no export {job_id!r}")
        return job

    def file(self, job_id: str, tenant: str, kind: str) -> Path:
        """The finished export's "gguf" or "modelfile"."""
        job = self.get(job_id, tenant)
        if job.state != SUCCEEDED:
            raise ExportNotFound(f"export {job_id!r} is {job.state}, not ready")
        gguf_path = self._folder(job) / job.gguf_name
        path = gguf_path if kind == "gguf" else modelfile_path(gguf_path)
        if not path.is_file():  # the tenant was shredded, or someone removed the files
            raise ExportNotFound(f"export {job_id!r} has no {kind} file any more")
        return path

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _folder(self, job: ExportJob) -> Path:
        return self.dir / job.tenant / job.id

    def _run(self, job: ExportJob, version) -> None:
        job.state = RUNNING
        started = time.perf_counter()
        kind = "lora" if job.adapter_only else "merged"
        out = self._folder(job) / f"{job.tenant}-{job.adapter}-{job.version}-{kind}.gguf"
        try:
            # 0700: the files are the tenant's model in clear (the home may be shared).
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            (self.dir / job.tenant).mkdir(mode=0o700, exist_ok=True)
            out.parent.mkdir(mode=0o700)
            result = export_version(self.sealer, resolve_model(self.model), job.tenant, version,
                                    out, job.dtype, adapter_only=job.adapter_only)
        except (ValueError, OSError, PullError) as e:  # each carries a clear message
            job.state, job.error = FAILED, str(e)
            log.warning("export %s failed: %s", job.id, e)
            return
        job.gguf_name, job.num_bytes = out.name, result.num_bytes
        job.seconds = time.perf_counter() - started
        self.registry.record_audit(
            job.created_by, "export.gguf", f"{job.tenant}/{job.adapter}",
            {"dtype": job.dtype, "version": job.version, "adapter_only": job.adapter_only,
             "out": str(out), "job": job.id}, tenant=job.tenant)
        job.state = SUCCEEDED

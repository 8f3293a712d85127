"""A tenant's datasets, training jobs and usage over HTTP, under /tenants/{tenant}/.

A tenant's key acts on its own tenant only (any other tenant gets 403, whether it exists or
not, so a key cannot probe for other clients); the admin key acts for every tenant. The
operations are the CLI's: `loraplex data add|list|rm`, `loraplex train` and `loraplex usage`,
and the tenant's fine-tuning settings (whether a fine-tuned version serves at once).
"""

import asyncio

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from loraplex.lora.modules import TARGET_MODULES
from loraplex.registry import Registry
from loraplex.registry.fine_tuning import FineTuningStore
from loraplex.server.admin import RotateBody, rotated_json, usage_report
from loraplex.server.auth import Authenticator
from loraplex.server.openapi import linked
from loraplex.server.protocol import OpenAIError
from loraplex.train.jobs import JobNotFound, TrainingJobs
from loraplex.vault import DatasetNotFound, MasterKeyError, Vault, VaultError

JOB_LINKS = linked(202, {"tenant": "$request.path.tenant", "job_id": "$response.body#/id"},
                   "GET /tenants/{tenant}/training-jobs/{job_id}",
                   "DELETE /tenants/{tenant}/training-jobs/{job_id}")


class TrainBody(BaseModel):
    """`loraplex train`'s options; bounds here give a 400 naming the field before any work."""

    dataset: str = Field(min_length=1, max_length=64)
    adapter: str = Field(min_length=1, max_length=64)
    dataset_version: int | None = Field(default=None, ge=1)
    rank: int = Field(default=16, ge=1, le=256)
    alpha: float = Field(default=32, gt=0)
    targets: list[str] = Field(default_factory=lambda: list(TARGET_MODULES), min_length=1)
    epochs: int = Field(default=1, ge=1, le=100)
    max_steps: int | None = Field(default=None, ge=1, le=100_000)
    lr: float = Field(default=2e-4, gt=0, le=1)
    batch_size: int = Field(default=4, ge=1, le=256)
    seed: int = 0
    eval_fraction: float = Field(default=0.1, ge=0, lt=1)
    promote: bool = False


class FineTuningSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    promote_new_versions: bool
    """A fine-tuning job's version of an adapter that already has one serves at once (True), or
    is only registered, to be tried as "<adapter>:vN" and promoted later (False, the default).
    An adapter's first version always serves."""


def tenant_data_router(registry: Registry, vault: Vault, jobs: TrainingJobs,
                       ledger, store: FineTuningStore, auth: Authenticator) -> APIRouter:
    router = APIRouter(prefix="/tenants/{tenant}")

    def actor(request: Request, tenant: str) -> str:
        """Who is acting, if the key may act on `tenant`'s data."""
        principal = auth.principal(request)
        if principal is None:
            raise OpenAIError(401, "invalid API key", "authentication_error",
                              code="invalid_api_key")
        if principal.role == "admin":
            return f"admin-key:{principal.key_id}"
        if principal.tenant_name != tenant:
            raise OpenAIError(403, "this key may only act on its own tenant's data",
                              "permission_error")
        return f"key:{principal.key_id}"

    def training(request: Request, tenant: str) -> tuple[TrainingJobs, str]:
        """(the jobs, the actor); jobs are always looked up within the path's tenant."""
        who = actor(request, tenant)
        registry.get_tenant(tenant)  # 404 for an unknown tenant
        return jobs, who

    @router.get("/fine-tuning-settings")
    async def fine_tuning_settings(tenant: str, request: Request):
        actor(request, tenant)
        tenant_id = registry.get_tenant(tenant).id
        return {"promote_new_versions": store.promotes_new_versions(tenant_id)}

    @router.put("/fine-tuning-settings")
    async def set_fine_tuning_settings(tenant: str, body: FineTuningSettings, request: Request):
        who = actor(request, tenant)
        tenant_id = registry.get_tenant(tenant).id
        store.set_promotes_new_versions(tenant_id, body.promote_new_versions, actor=who)
        return {"promote_new_versions": body.promote_new_versions}

    @router.post("/keys/{key_id}/rotate")
    async def rotate_key(tenant: str, key_id: str, request: Request,
                         body: RotateBody | None = None):
        """Rotate one of the tenant's keys (the one calling, typically): the new key now, the
        old one expires after the overlap."""
        who = actor(request, tenant)
        overlap = (body or RotateBody()).overlap_seconds
        new_id, key, old = registry.rotate_key(key_id, actor=who, overlap_s=overlap,
                                               tenant=tenant)
        return rotated_json(new_id, key, old)

    @router.get("/usage")
    async def usage(tenant: str, request: Request, start: str | None = Query(None, alias="from"),
                    end: str | None = Query(None, alias="to"), group_by: str = "day"):
        """The tenant's own usage from the ledger, as GET /admin/usage groups it."""
        actor(request, tenant)
        return await usage_report(registry, ledger, [tenant], start, end, group_by)

    @router.post("/datasets/{name}", status_code=201)
    async def add_dataset(tenant: str, name: str, request: Request):
        """The body is the JSONL file itself (curl --data-binary @data.jsonl)."""
        who = actor(request, tenant)
        data = await read_body(request, vault.max_dataset_bytes)
        version = await asyncio.to_thread(_vault_call, vault.add, tenant, name, data, actor=who)
        return _dataset_json(version)

    @router.get("/datasets")
    async def list_datasets(tenant: str, request: Request):
        actor(request, tenant)
        versions = await asyncio.to_thread(_vault_call, vault.list, tenant)
        return {"datasets": [_dataset_json(v) for v in versions]}

    @router.delete("/datasets/{name}")
    async def remove_dataset(tenant: str, name: str, request: Request):
        who = actor(request, tenant)
        versions = await asyncio.to_thread(_vault_call, vault.remove, tenant, name, actor=who)
        return {"deleted": name, "versions": [v.label for v in versions]}

    @router.post("/training-jobs", status_code=202, responses=JOB_LINKS)
    async def start_training(tenant: str, body: TrainBody, request: Request):
        """Queue a training job; poll GET .../training-jobs/{id} for its progress."""
        queue, who = training(request, tenant)
        job = queue_training_job(registry, vault, queue, tenant, body, who)
        return JSONResponse(job.as_json(), status_code=202,
                            headers={"location": f"/tenants/{tenant}/training-jobs/{job.id}"})

    @router.get("/training-jobs")
    async def list_training(tenant: str, request: Request):
        queue, _ = training(request, tenant)
        return {"jobs": [job.as_json() for job in queue.list(tenant)]}

    @router.get("/training-jobs/{job_id}")
    async def training_status(tenant: str, job_id: str, request: Request):
        queue, _ = training(request, tenant)
        return _job_call(queue.get, job_id, tenant).as_json()

    @router.delete("/training-jobs/{job_id}")
    async def cancel_training(tenant: str, job_id: str, request: Request):
        queue, who = training(request, tenant)
        return cancel_training_job(registry, queue, tenant, job_id, who).as_json()

    return router


def queue_training_job(registry: Registry, vault: Vault, jobs: TrainingJobs, tenant: str,
                       body: TrainBody, who: str):
    """Check, queue and audit a training job (this API's and the console's)."""
    options = body.model_dump()
    _check_before_queueing(vault, tenant, options)
    job = jobs.start(tenant, actor=who, **options)
    try:
        registry.record_audit(who, "train.start", f"{tenant}/{body.adapter}",
                              {"job": job.id, **options}, tenant=tenant)
    except Exception:
        # Its client is told the job was refused (a full disk: 507): it must not run, and
        # unaudited. Cancelling is race-free: a job is queued, or running with its worker.
        jobs.cancel(job.id)
        raise
    return job


def cancel_training_job(registry: Registry, jobs: TrainingJobs, tenant: str, job_id: str,
                        who: str):
    """Cancel one of the tenant's jobs (another's is a 404) and audit it."""
    job = _job_call(jobs.cancel, job_id, tenant)
    registry.record_audit(who, "train.cancel", f"{tenant}/{job.adapter}", {"job": job.id},
                          tenant=tenant)
    return job


def _check_before_queueing(vault: Vault, tenant: str, options: dict) -> None:
    """Errors a client should get now, not minutes later from the job: bad hyperparameters,
    a bad adapter name, a missing dataset."""
    from loraplex.registry.tenants import check_name
    from loraplex.train.trainer import check_hyperparameters

    try:
        check_name("adapter", options["adapter"])
        check_hyperparameters(options["rank"], options["alpha"], options["targets"],
                              options["epochs"], options["max_steps"], options["lr"],
                              options["batch_size"], options["eval_fraction"])
    except ValueError as e:
        raise OpenAIError(400, str(e)) from None
    _vault_call(vault.get, tenant, options["dataset"], options["dataset_version"])


def _vault_call(function, *args, **kwargs):
    """Run a vault operation; its errors become OpenAI-style errors (registry errors pass on
    to the app's handler: unknown tenant 404, bad name 400)."""
    try:
        return function(*args, **kwargs)
    except DatasetNotFound as e:
        raise OpenAIError(404, str(e)) from None
    except MasterKeyError as e:  # the operator's configuration, not the client's request
        raise OpenAIError(500, f"the server's vault is misconfigured: {e}", "server_error"
                          ) from None
    except VaultError as e:
        raise OpenAIError(400, str(e)) from None


def _job_call(function, job_id: str, tenant: str | None):
    try:
        return function(job_id, tenant)
    except JobNotFound as e:
        raise OpenAIError(404, str(e)) from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` (chunked uploads too)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise OpenAIError(413, f"dataset too large: over {limit} bytes (the limit)")
        chunks.append(chunk)
    return b"".join(chunks)


def _dataset_json(version) -> dict:
    return {"name": version.name, "version": version.label, "records": version.num_records,
            "bytes": version.size_bytes, "sha256": version.sha256,
            "created_at": version.created_at, "created_by": version.created_by}

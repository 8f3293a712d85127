"""/v1/fine_tuning/jobs: OpenAI's fine-tuning API (create, list, retrieve, cancel, events,
checkpoints) over train/fine_tuning.py, for a tenant's key. Another tenant's job id is
answered exactly like a missing one (404)."""

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from loraplex.registry import InvalidInput
from loraplex.registry.fine_tuning import FineTuningStore
from loraplex.registry.tenants import Principal
from loraplex.server.openapi import linked
from loraplex.server.protocol import OpenAIError, refuse_unknown_query
from loraplex.server.serving import Serving
from loraplex.train.fine_tuning import FineTuning, FineTuningError, JobRequest

MAX_METADATA_PAIRS = 16  # OpenAI's metadata limits
PAGE_QUERY = ("after", "limit")
Auto = Literal["auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Strict):
    n_epochs: Auto | int = "auto"
    batch_size: Auto | int = "auto"
    learning_rate_multiplier: Auto | float = "auto"


class Supervised(_Strict):
    hyperparameters: Hyperparameters | None = None


class Method(_Strict):
    type: Literal["supervised"]  # DPO and reinforcement fine-tuning are not offered
    supervised: Supervised | None = None


class CreateJob(_Strict):
    model: str = Field(min_length=1, max_length=200)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, min_length=1, max_length=64)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(default=None, min_length=1, max_length=64)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[dict] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value):
        if value is not None and (len(value) > MAX_METADATA_PAIRS or any(
                len(k) > 64 or len(v) > 512 for k, v in value.items())):
            raise ValueError(f"at most {MAX_METADATA_PAIRS} pairs, keys up to 64 characters, "
                             "values up to 512")
        return value

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, value):
        if value:
            raise ValueError("integrations (Weights & Biases) are not supported by this server")
        return value

    def to_request(self) -> JobRequest:
        if self.hyperparameters and self.method and self.method.supervised and (
                self.method.supervised.hyperparameters):
            raise OpenAIError(400, "give hyperparameters either at the top level or in "
                              "method.supervised, not both", param="hyperparameters")
        hyper = self.hyperparameters or (
            self.method and self.method.supervised and self.method.supervised.hyperparameters
        ) or Hyperparameters()
        return JobRequest(self.model, self.training_file, self.validation_file, hyper.n_epochs,
                          hyper.batch_size, hyper.learning_rate_multiplier, self.suffix,
                          self.seed, self.metadata)


JOB_LINKS = linked(200, {"job_id": "$response.body#/id"}, "GET /v1/fine_tuning/jobs/{job_id}",
                   "POST /v1/fine_tuning/jobs/{job_id}/cancel",
                   "GET /v1/fine_tuning/jobs/{job_id}/events",
                   "GET /v1/fine_tuning/jobs/{job_id}/checkpoints")


def fine_tuning_router(serving: Serving, fine_tuning: FineTuning,
                       store: FineTuningStore) -> APIRouter:
    router = APIRouter(prefix="/v1/fine_tuning/jobs")
    Tenant = Annotated[Principal, Depends(serving.authenticate)]
    Limit = Annotated[int, Query(ge=1, le=100)]

    @router.post("", responses=JOB_LINKS)
    async def create(body: CreateJob, principal: Tenant):
        return await asyncio.to_thread(_call, fine_tuning.create, principal, body.to_request(),
                                       actor=f"key:{principal.key_id}")

    @router.get("")
    async def list_jobs(request: Request, principal: Tenant, after: str | None = None,
                        limit: Limit = 20):
        refuse_unknown_query(request, PAGE_QUERY)
        return _page(_call, store.list_jobs, principal.tenant_id, after, limit)

    @router.get("/{job_id}")
    async def retrieve(job_id: str, principal: Tenant):
        return _call(fine_tuning.get, principal.tenant_id, job_id)

    @router.post("/{job_id}/cancel")
    async def cancel(job_id: str, principal: Tenant):
        return await asyncio.to_thread(_call, fine_tuning.cancel, principal, job_id,
                                       actor=f"key:{principal.key_id}")

    @router.get("/{job_id}/events")
    async def events(job_id: str, request: Request, principal: Tenant,
                     after: str | None = None, limit: Limit = 20):
        refuse_unknown_query(request, PAGE_QUERY)
        _call(fine_tuning.get, principal.tenant_id, job_id)  # 404 unless the tenant's
        return _page(_call, store.list_events, job_id, after, limit)

    @router.get("/{job_id}/checkpoints")
    async def checkpoints(job_id: str, request: Request, principal: Tenant,
                          after: str | None = None, limit: Limit = 10):
        refuse_unknown_query(request, PAGE_QUERY)
        _call(fine_tuning.get, principal.tenant_id, job_id)
        return _page(_call, store.list_checkpoints, job_id, after, limit)

    return router


def _call(function, *args, **kwargs):
    """The service's typed errors as OpenAI-style errors."""
    try:
        return function(*args, **kwargs)
    except FineTuningError as e:
        status = {"invalid": 400, "not_found": 404, "conflict": 409}[e.kind]
        raise OpenAIError(status, str(e), param=e.param, code=e.code) from None
    except InvalidInput as e:  # a page cursor or limit
        raise OpenAIError(400, str(e), param="after") from None


def _page(call, function, *args) -> dict:
    items, has_more = call(function, *args)
    return {"object": "list", "data": items, "has_more": has_more,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None}

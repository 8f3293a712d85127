"""Training jobs: start one with the usual hyperparameters, follow its progress live (step,
loss, ETA; the held-out loss before and after once it is done), cancel it."""

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError

from loraplex.lora.modules import TARGET_MODULES
from loraplex.registry import NotFound
from loraplex.server.console.context import PREFIX, Console, render
from loraplex.server.console.forms import checkbox, integer, number, text
from loraplex.server.console.guard import (
    ConsoleRoute,
    FormError,
    checked_form,
    signed_in,
    tenant_scope,
)
from loraplex.server.console.sessions import Session
from loraplex.server.console.tenants import see_other
from loraplex.server.tenant_data import TrainBody, cancel_training_job, queue_training_job
from loraplex.train.jobs import FINISHED, RUNNING, TrainingJob

DEFAULTS = TrainBody(dataset="-", adapter="-")  # the form's initial values: the API's defaults


def train_body(form) -> TrainBody:
    """The API's TrainBody from the form; its bounds' complaints name the field."""
    fields = {"dataset": text(form, "dataset"), "adapter": text(form, "adapter"),
              "targets": [t for t in TARGET_MODULES if checkbox(form, f"target_{t}")],
              "promote": checkbox(form, "promote")}
    for name in ("rank", "epochs", "max_steps", "batch_size", "seed", "dataset_version"):
        fields[name] = integer(form, name)
    for name in ("alpha", "lr", "eval_fraction"):
        fields[name] = number(form, name)
    try:
        return TrainBody(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FormError(f"{where}: {first['msg']}") from None


def job_view(console: Console, job: TrainingJob) -> dict:
    """What the page shows of a job: its state, progress, ETA and held-out losses."""
    eta = None
    if job.state == RUNNING and job.started_at and job.step and job.num_steps:
        elapsed = time.time() - job.started_at
        eta = elapsed / job.step * (job.num_steps - job.step)
    record = {}
    if job.version is not None:
        try:
            version = console.registry.get_version(job.tenant, job.adapter,
                                                   int(job.version.removeprefix("v")))
            record = version.training_record or {}
        except NotFound:
            pass
    return {"job": job, "eta_s": eta, "eval_before": record.get("eval_loss_before"),
            "eval_after": record.get("eval_loss_after"), "is_finished": job.state in FINISHED}


def training_routes(console: Console) -> APIRouter:
    router = APIRouter(prefix=f"{PREFIX}/tenants/{{tenant}}/training", route_class=ConsoleRoute)
    Signed = Annotated[Session, Depends(signed_in(console))]

    def jobs_of(tenant: str) -> list[dict]:
        jobs = sorted(console.jobs.list(tenant), key=lambda j: j.created_at, reverse=True)
        return [job_view(console, job) for job in jobs]

    @router.get("")
    async def training(request: Request, tenant: str, session: Signed):
        tenant_scope(console, session, tenant)
        names = sorted({v.name for v in console.vault.list(tenant)})
        return render(request, "training.html", tenant=tenant, jobs=jobs_of(tenant),
                      datasets=names, defaults=DEFAULTS, targets=TARGET_MODULES)

    @router.get("/jobs")
    async def jobs(request: Request, tenant: str, session: Signed):
        """The jobs table alone: the page polls this while a job is not finished."""
        tenant_scope(console, session, tenant)
        return render(request, "partials/jobs.html", tenant=tenant, jobs=jobs_of(tenant))

    @router.post("")
    async def start(request: Request, tenant: str, session: Signed):
        tenant_scope(console, session, tenant)
        form = await checked_form(request, session)
        queue_training_job(console.registry, console.vault, console.jobs, tenant,
                           train_body(form), session.actor)
        return see_other(f"{PREFIX}/tenants/{tenant}/training")

    @router.post("/{job_id}/cancel")
    async def cancel(request: Request, tenant: str, job_id: str, session: Signed):
        tenant_scope(console, session, tenant)
        await checked_form(request, session)
        cancel_training_job(console.registry, console.jobs, tenant, job_id, session.actor)
        return see_other(f"{PREFIX}/tenants/{tenant}/training")

    return router

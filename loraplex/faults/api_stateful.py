"""Schemathesis' stateful testing of the HTTP API: hypothesis draws sequences of calls that
follow the links of the app's own OpenAPI schema (a created tenant's keys, quota, adapters and
vault; a created key revoked or rotated; a queued fine-tuning or training job read and
cancelled), against the whole app in-process (fuzz_app: the tiny model, tenants t00 and t01).

Every answer goes through schemathesis' default checks (no 5xx, a documented status and content
type, a body matching its documented schema: OpenAI's error body for every 4xx) but one, off in
CONFIG with the reason. The admin key calls /admin/..., t00's key the tenant and OpenAI routes.

    report = run_stateful(root, examples=100, seed=0)
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis import seed as hypothesis_seed

from loraplex.faults.fuzz_requests import FuzzApp, fuzz_app
from loraplex.faults.harness import ADAPTER

STEPS_PER_SCENARIO = 8  # calls in one drawn sequence: enough for create -> use -> revoke chains
# The scenarios share one app (a fresh one each would start an engine each), so a call can answer
# differently than it did for an earlier scenario with the same start (a tenant's name is taken
# now: 409, not 200). Hypothesis calls that flaky and ends the run; schemathesis' own runner then
# starts another suite on a new seed, and so does run_machine, up to this many.
MAX_SUITES = 20


@dataclass
class Report:
    examples: int  # scenarios (sequences of calls) asked for
    seed: int
    scenarios: int = 0  # run
    suites: int = 0  # hypothesis runs, one seed each (MAX_SUITES)
    links: int = 0  # the schema's links between operations
    calls: Counter = field(default_factory=Counter)  # "METHOD /path" -> calls made
    linked: Counter = field(default_factory=Counter)  # those whose parameters a link supplied
    statuses: Counter = field(default_factory=Counter)
    by_status: Counter = field(default_factory=Counter)
    failure: str | None = None  # schemathesis' report of the first failing check, shrunk
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failure is None

    def as_dict(self) -> dict:
        return {"ok": self.ok, "examples": self.examples, "seed": self.seed,
                "scenarios": self.scenarios, "suites": self.suites,
                "links": self.links, "calls": sum(self.calls.values()),
                "linked_calls": sum(self.linked.values()), "operations": len(self.calls),
                "statuses": {str(s): n for s, n in sorted(self.statuses.items())},
                "per_operation": dict(sorted(self.calls.items())),
                "linked_per_operation": dict(sorted(self.linked.items())),
                "by_status": dict(sorted(self.by_status.items())),
                "failure": self.failure, "seconds": round(self.seconds, 1)}


def config(app: FuzzApp, seed: int):
    from schemathesis.config import SchemathesisConfig

    return SchemathesisConfig.from_dict({
        "seed": seed,
        "checks": {
            # Off: a schema-valid request may still be refused for what a JSON schema cannot
            # say (an unknown pagination cursor, a name the registry refuses, hyperparameters
            # that do not fit together); that 400 still has to be documented and in OpenAI's
            # error shape, which the other checks see to.
            "positive_data_acceptance": {"enabled": False},
        },
        "operations": [{
            # Off: DELETE of a training job cancels it, and the job stays readable in state
            # "cancelled" (its record and error are what the console and CLI show), so a
            # 200 after the DELETE is the intended answer, not a deleted resource still served.
            "include-path-regex": "^/tenants/\\{tenant\\}/training-jobs/",
            "checks": {"use_after_free": {"enabled": False}}}],
        # Only the schema's own links: inference guesses from names (a tenant's "tenant" field,
        # a file's "file_id") where our answers, which declare no schemas, say "name" and "id".
        "phases": {"stateful": {"inference": {"algorithms": []}}},
        # Body fields that must name something that exists for a call to get past its lookup:
        # the fuzz app's training file and dataset, and t00's adapter.
        "parameters": {"body.training_file": app.training_file, "body.dataset": "data",
                       "body.model": ADAPTER},
    })


def pin_path(case) -> None:
    """Path parameters a drawn value would almost never get right, so every call would stop at
    a 403/404: the tenant routes act on the key's own tenant (t00), the admin's adapter
    operations on t01's adapter (t00's stays as the tenant's requests expect it)."""
    path = case.operation.path
    if path.startswith("/tenants/{tenant}"):
        case.path_parameters["tenant"] = "t00"
    elif path.startswith("/admin/tenants/{tenant}/adapters/{name}"):
        case.path_parameters.update(tenant="t01", name=ADAPTER)


def state_machine(app: FuzzApp, report: Report, schema=None):
    """The schemathesis state machine over `app` (or over `schema`, loaded from it), which
    counts its scenarios and calls in `report` and keeps the first failing check there."""
    import schemathesis
    from schemathesis.core.failures import FailureGroup

    if schema is None:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app.app,
                                                config=config(app, report.seed))
    base = schema.as_state_machine()
    report.links = schema.statistic.transitions.total

    class APIStateMachine(base):
        def setup(self) -> None:
            report.scenarios += 1
            super().setup()

        def step(self, input):
            label = input.case.operation.label
            report.calls[label] += 1
            if input.transition is not None and input.is_applied:
                report.linked[label] += 1
            return super().step(input)

        def before_call(self, case) -> None:
            pin_path(case)
            super().before_call(case)

        def get_call_kwargs(self, case) -> dict:
            return {"headers": app.headers(
                "admin" if case.operation.path.startswith("/admin/") else "tenant")}

        def after_call(self, response, case) -> None:
            report.statuses[response.status_code] += 1
            report.by_status[f"{case.operation.label} {response.status_code}"] += 1
            super().after_call(response, case)

        def validate_response(self, response, case, *args, **kwargs) -> None:
            try:
                super().validate_response(response, case, *args, **kwargs)
            except FailureGroup as failure:
                report.failure = report.failure or str(failure)
                raise

    return APIStateMachine


def run_machine(machine, examples: int, report: Report) -> None:
    """Run `examples` scenarios, in suites of one seed each (report.seed, then the next, ...),
    until a check fails."""
    from hypothesis.errors import Flaky
    from schemathesis.core.failures import FailureGroup

    for suite in range(MAX_SUITES):
        if report.scenarios >= examples or report.failure is not None:
            return
        report.suites += 1
        try:
            # No shrinking: a replay would find the shared app changed (see MAX_SUITES).
            hypothesis_seed(report.seed + suite)(machine).run(settings=settings(
                max_examples=examples - report.scenarios, stateful_step_count=STEPS_PER_SCENARIO,
                deadline=None, database=None, print_blob=False, report_multiple_bugs=False,
                suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate)))
        except (FailureGroup, Flaky):
            pass  # a failing check is in the report already; Flaky only ends the suite


def run_stateful(root: Path, examples: int, seed: int, *,
                 model_dir: Path | None = None) -> Report:
    """`examples` scenarios on an app over a fresh home under `root` (the tiny model built there
    too unless `model_dir` is one already built)."""
    from loraplex.faults.tiny_model import write_tiny_model

    model_dir = model_dir or write_tiny_model(Path(root) / "model")
    with fuzz_app(Path(root) / "api", model_dir) as app:
        return run_on_app(app, examples, seed)


def run_on_app(app: FuzzApp, examples: int, seed: int) -> Report:
    """`examples` scenarios of up to STEPS_PER_SCENARIO calls on `app`."""
    started = time.perf_counter()
    report = Report(examples, seed)
    run_machine(state_machine(app, report), examples, report)
    report.seconds = time.perf_counter() - started
    return report

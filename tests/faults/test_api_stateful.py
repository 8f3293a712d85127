"""Schemathesis' stateful run over the HTTP API (loraplex/faults/api_stateful.py): every check
passes on sequences that really follow the schema's links, and a route broken on purpose fails
the run."""

import json

from loraplex.faults.api_stateful import run_on_app, run_stateful
from loraplex.faults.fuzz_requests import fuzz_app
from loraplex.server.protocol import OpenAIError

SCENARIOS = 200  # ~20 s on 2 cores


def test_stateful_run_passes_its_checks(tmp_path, fault_model):
    report = run_stateful(tmp_path, examples=SCENARIOS, seed=0, model_dir=fault_model)
    summary = report.as_dict()
    print(json.dumps({k: summary[k] for k in ("scenarios", "suites", "links", "calls",
                                              "linked_calls", "operations", "statuses",
                                              "seconds")}))
    assert report.ok, report.failure
    assert report.scenarios >= SCENARIOS
    # It exercised chains, not lone calls: created tenants' keys and quota, queued jobs read and
    # cancelled, t01's adapter promoted and rolled back.
    assert sum(report.linked.values()) >= 20, summary["linked_per_operation"]
    assert len(report.calls) >= 12, summary["per_operation"]


def test_a_broken_route_fails_the_run(tmp_path, fault_model, monkeypatch):
    with fuzz_app(tmp_path, fault_model) as app:
        def broken(*args, **kwargs):
            raise OpenAIError(500, "broken on purpose", "server_error")

        monkeypatch.setattr(app.app.state.registry, "create_tenant", broken)
        report = run_on_app(app, examples=20, seed=0)
    assert not report.ok
    assert "broken on purpose" in report.failure

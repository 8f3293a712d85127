"""The fine-tuning service across a restart: a job that was running fails with a reason, one
that was waiting is queued again."""

import time

from loraplex.registry import Registry
from loraplex.registry.fine_tuning import FineTuningStore
from loraplex.train.fine_tuning import FineTuning
from loraplex.vault import Vault

from .conftest import GREETINGS


class FakeJobs:
    is_closed = False

    def __init__(self):
        self.started = []

    def start(self, tenant, **options):
        self.started.append((tenant, options))


class FakeWebhooks:
    def __init__(self):
        self.published = []

    def publish(self, tenant_id, event_type, data):
        self.published.append((tenant_id, event_type, data))


def job(job_id: str, status: str, training_file: str) -> dict:
    return {"id": job_id, "status": status, "organization_id": "acme", "model": "base",
            "training_file": training_file, "validation_file": None, "continued_from": None,
            "adapter": "helper", "seed": 1, "error": None, "finished_at": None,
            "hyperparameters": {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 1}}


def test_a_restart_fails_running_jobs_and_queues_waiting_ones(home):
    registry, vault, store = Registry(home), Vault(home), FineTuningStore(home)
    tenant_id = registry.get_tenant("acme").id
    training = vault.add_file("acme", "chats.jsonl", "fine-tune", GREETINGS, actor="t")
    for job_id, status in [("ftjob-run", "running"), ("ftjob-wait", "queued"),
                           ("ftjob-new", "validating_files"), ("ftjob-done", "succeeded")]:
        store.add_job(tenant_id, job(job_id, status, training.id), actor="t")
    jobs, webhooks = FakeJobs(), FakeWebhooks()
    service = FineTuning(registry, vault, jobs, store, webhooks, "base")
    deadline = time.monotonic() + 30
    while len(jobs.started) < 2 and time.monotonic() < deadline:  # re-validated off-thread
        time.sleep(0.05)
    service.close()

    failed = store.get_job(tenant_id, "ftjob-run")
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_restarted"
    assert webhooks.published == [(tenant_id, "fine_tuning.job.failed", {"id": "ftjob-run"})]
    assert {store.get_job(tenant_id, j)["status"] for j in ("ftjob-wait", "ftjob-new")} == {
        "queued"}
    assert [options["job_id"] for _, options in jobs.started] == ["ftjob-wait", "ftjob-new"]
    assert store.get_job(tenant_id, "ftjob-done")["status"] == "succeeded"
    events = store.list_events("ftjob-run", None, 10)[0]
    assert events[0]["level"] == "error" and "stopped" in events[0]["message"]

"""OpenAI's fine-tuning API driven by the official openai client only: files, jobs, events,
checkpoints, webhook endpoints; each tenant's key on its own objects only."""

import http.server
import json
import threading
import time

import httpx
import openai
import pytest

from loraplex.config import EngineConfig
from loraplex.engine.async_engine import AsyncEngine
from loraplex.registry import Registry
from loraplex.registry.fine_tuning import FineTuningStore
from loraplex.server.app import ServerSettings, create_app
from loraplex.server.thread import ServerThread
from loraplex.train.jobs import TrainingJobs
from loraplex.validation import adapter_validator
from loraplex.vault.crypto import MASTER_KEY_ENV

BASE = "tiny"
FINISHED = ("succeeded", "failed", "cancelled")


def chats(n: int, tag: str = "") -> bytes:
    return "".join(json.dumps({"messages": [
        {"role": "user", "content": f"Hi {i}{tag}"},
        {"role": "assistant", "content": f"Yo {i} Kumquat{tag}"}]}) + "\n"
        for i in range(n)).encode()


# lr 2e-4 x 50 = 1e-2: a tiny model learns something in a few steps.
FAST = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 50}


class Receiver:
    """A webhook receiver on loopback: records each POST; answers `statuses` in turn, then 200."""

    def __init__(self, statuses=()):
        self.requests, self.statuses = [], list(statuses)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(outer.statuses.pop(0) if outer.statuses else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float = 60) -> list:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(self.requests) >= count, self.requests
        return self.requests


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(MASTER_KEY_ENV, raising=False)
        home = tmp_path_factory.mktemp("home")
        registry = Registry(home)
        keys = {}
        for tenant in ("acme", "globex"):
            registry.create_tenant(tenant, actor="test")
            keys[tenant] = registry.create_key(tenant, actor="test")[1]
        keys["admin"] = registry.create_admin_key(actor="test")[1]
        engine = AsyncEngine(EngineConfig(model=str(tiny_llama_dir), max_loras=2,
                                          max_cpu_loras=4, max_lora_rank=16, max_model_len=128,
                                          kv_cache_bytes=1 << 22))
        settings = ServerSettings(base_model_name=BASE, max_upload_bytes=1 << 20,
                                  allow_private_webhooks=True,
                                  webhook_retry_delays_s=(0.2, 0.2))
        jobs = TrainingJobs(home, str(tiny_llama_dir))
        app = create_app(engine, registry, settings, adapter_validator(str(tiny_llama_dir)),
                         jobs)
        with ServerThread(app) as url:
            yield {"url": url, "keys": keys, "registry": registry, "home": home}


def client(server, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=server["keys"][tenant],
                         max_retries=0)


def wait_done(api: openai.OpenAI, job_id: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.fine_tuning.jobs.retrieve(job_id)
        if job.status in FINISHED:
            return job
        time.sleep(0.3)
    raise AssertionError(f"{job_id} still {job.status} after {timeout} s")


def upload(api: openai.OpenAI, data: bytes, name: str = "chats.jsonl"):
    return api.files.create(file=(name, data), purpose="fine-tune")


def test_upload_train_poll_events_checkpoints_chat(server):
    acme = client(server, "acme")
    training, validation = upload(acme, chats(16)), upload(acme, chats(4, "!"), "valid.jsonl")
    assert (training.object, training.purpose, training.status) == ("file", "fine-tune",
                                                                    "processed")
    assert training.bytes == len(chats(16)) and training.filename == "chats.jsonl"
    assert {f.id for f in acme.files.list()} >= {training.id, validation.id}
    assert acme.files.retrieve(training.id).filename == "chats.jsonl"
    assert acme.files.content(training.id).content == chats(16)

    job = acme.fine_tuning.jobs.create(model=BASE, training_file=training.id,
                                       validation_file=validation.id, hyperparameters=FAST,
                                       suffix="helper", seed=7, metadata={"ticket": "T-1"})
    assert job.status == "validating_files" and job.id.startswith("ftjob-")
    assert job.hyperparameters.n_epochs == 2 and job.seed == 7
    done = wait_done(acme, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "helper:v1" and done.trained_tokens > 0
    assert done.finished_at >= done.created_at and done.metadata == {"ticket": "T-1"}
    assert [j.id for j in acme.fine_tuning.jobs.list()] [:1] == [job.id]

    events = list(acme.fine_tuning.jobs.list_events(job.id, limit=100))
    messages = [e.message for e in events]  # newest first
    assert messages[0] == "The job has successfully completed"
    assert "Fine-tuning job started" in messages and messages[-1].startswith("Validating")
    metrics = [e.data for e in events if e.type == "metrics"]
    assert sorted(m["step"] for m in metrics) == list(range(1, 9))  # 16 records / 4, 2 epochs
    # Pages follow the cursor without gaps or repeats.
    first = acme.fine_tuning.jobs.list_events(job.id, limit=5)
    second = acme.fine_tuning.jobs.list_events(job.id, limit=5, after=first.data[-1].id)
    assert [e.id for e in first.data + second.data] == [e.id for e in events[:10]]
    assert first.has_more

    checkpoints = list(acme.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [8, 4]  # each epoch's end, newest first
    assert all(c.metrics.valid_loss is not None and c.metrics.train_loss is not None
               for c in checkpoints)
    assert checkpoints[0].fine_tuned_model_checkpoint == "helper:v1"

    for model in (done.fine_tuned_model, "helper"):
        answer = acme.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
            temperature=0)
        assert answer.headers["x-loraplex-adapter-version"] == "v1"
    record = server["registry"].get_version("acme", "helper", 1).training_record
    assert record["eval_dataset"] == validation.id and record["steps"] == 8


def test_a_later_version_is_registered_or_promoted_as_the_tenant_chose(server):
    acme = client(server, "acme")
    training = upload(acme, chats(8))
    first = wait_done(acme, acme.fine_tuning.jobs.create(
        model=BASE, training_file=training.id, suffix="later", hyperparameters=FAST).id)
    # Continuing from the adapter: v2 of "later", registered but not serving by default.
    second = wait_done(acme, acme.fine_tuning.jobs.create(
        model="later", training_file=training.id, hyperparameters={"n_epochs": 1}).id)
    assert (first.fine_tuned_model, second.fine_tuned_model) == ("later:v1", "later:v2")
    registry = server["registry"]
    assert registry.get_version("acme", "later", 2).training_record["continued_from"]
    assert registry.show_adapter("acme", "later").split == {1: 100}
    settings = f"{server['url']}/tenants/acme/fine-tuning-settings"
    auth = {"authorization": f"Bearer {server['keys']['acme']}"}
    assert httpx.put(settings, json={"promote_new_versions": True}, headers=auth).json() == {
        "promote_new_versions": True}
    assert httpx.put(settings, json={"promote": True}, headers=auth).status_code == 400
    third = wait_done(acme, acme.fine_tuning.jobs.create(
        model="later:v1", training_file=training.id, hyperparameters={"n_epochs": 1}).id)
    assert third.fine_tuned_model == "later:v3"
    assert registry.show_adapter("acme", "later").split == {3: 100}
    httpx.put(settings, json={"promote_new_versions": False}, headers=auth)


def test_cancel_a_running_job(server):
    acme = client(server, "acme")
    training = upload(acme, chats(16))
    job = acme.fine_tuning.jobs.create(model=BASE, training_file=training.id, suffix="slow",
                                       hyperparameters={"n_epochs": 50, "batch_size": 1})
    deadline = time.monotonic() + 120
    while not any(e.type == "metrics" for e in acme.fine_tuning.jobs.list_events(job.id)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert acme.fine_tuning.jobs.retrieve(job.id).status == "running"
    acme.fine_tuning.jobs.cancel(job.id)
    done = wait_done(acme, job.id, timeout=60)
    assert done.status == "cancelled" and done.fine_tuned_model is None
    assert "slow" not in [a.name for a in server["registry"].list_adapters("acme")]
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        acme.fine_tuning.jobs.cancel(job.id)


def test_another_tenant_gets_404_on_the_file_the_job_and_the_model(server):
    acme, globex = client(server, "acme"), client(server, "globex")
    training = upload(acme, chats(8))
    job = wait_done(acme, acme.fine_tuning.jobs.create(
        model=BASE, training_file=training.id, suffix="private", hyperparameters=FAST).id)
    for call in (lambda: globex.files.retrieve(training.id),
                 lambda: globex.files.content(training.id),
                 lambda: globex.files.delete(training.id),
                 lambda: globex.fine_tuning.jobs.retrieve(job.id),
                 lambda: globex.fine_tuning.jobs.cancel(job.id),
                 lambda: globex.fine_tuning.jobs.list_events(job.id),
                 lambda: globex.fine_tuning.jobs.checkpoints.list(job.id),
                 lambda: globex.chat.completions.create(
                     model=job.fine_tuned_model, max_tokens=2,
                     messages=[{"role": "user", "content": "Hi"}])):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError, match="no such file") as refused:
        globex.fine_tuning.jobs.create(model=BASE, training_file=training.id)
    assert refused.value.body["param"] == "training_file"
    assert training.id not in {f.id for f in globex.files.list()}
    assert job.id not in {j.id for j in globex.fine_tuning.jobs.list()}
    # A cursor from another tenant's list is unknown here.
    with pytest.raises(openai.BadRequestError):
        globex.fine_tuning.jobs.list(after=job.id)


@pytest.mark.parametrize("data, words", [
    (b'{"messages": [{"role": "user", "content": "Hi"}]}\n{not json\n', "line 2: invalid JSON"),
    (json.dumps({"messages": [{"role": "wizard", "content": "Hi"}]}).encode(), "line 1"),
    (b"", "empty dataset"),
    (b"\n\n", "empty dataset"),
])
def test_bad_files_fail_at_upload_with_openais_error_shape(server, data, words):
    acme = client(server, "acme")
    before = {f.id for f in acme.files.list()}
    with pytest.raises(openai.BadRequestError, match=words) as refused:
        upload(acme, data)
    assert refused.value.body["param"] == "file"
    assert refused.value.body["code"] == "invalid_file_format"
    assert refused.value.body["type"] == "invalid_request_error"
    assert {f.id for f in acme.files.list()} == before


def test_deleting_a_file_shreds_it(server):
    acme = client(server, "acme")
    stored = upload(acme, chats(2))
    assert acme.files.delete(stored.id).deleted
    with pytest.raises(openai.NotFoundError):
        acme.files.content(stored.id)
    with pytest.raises(openai.NotFoundError):
        acme.files.delete(stored.id)


@pytest.mark.parametrize("changes, param", [
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters"),
    ({"hyperparameters": {"n_epochs": "many"}}, "hyperparameters"),
    ({"suffix": "Not A Name"}, "suffix"),
    ({"extra_body": {"temperature": 1}}, "temperature"),
    ({"method": {"type": "dpo"}}, "method"),
    ({"training_file": "file-nope"}, "training_file"),
])
def test_bad_job_requests_are_400_naming_the_field(server, changes, param):
    acme = client(server, "acme")
    training = upload(acme, chats(4))
    with pytest.raises(openai.BadRequestError) as refused:
        acme.fine_tuning.jobs.create(**{"model": BASE, "training_file": training.id, **changes})
    assert param in (refused.value.body["param"] or "") + refused.value.body["message"]


def test_list_filters_we_do_not_apply_are_refused_by_name(server):
    acme = client(server, "acme")
    with pytest.raises(openai.BadRequestError, match=r"metadata\[ticket\]"):
        acme.fine_tuning.jobs.list(metadata={"ticket": "T-1"})
    for call in (lambda: acme.files.list(extra_query={"status": "processed"}),
                 lambda: acme.webhooks.list(extra_query={"x": "1"})):
        with pytest.raises(openai.BadRequestError, match="Unrecognized query parameter"):
            call()
    assert acme.fine_tuning.jobs.list(limit=1).object == "list"  # known ones still work


def test_an_unknown_model_is_404(server):
    acme = client(server, "acme")
    training = upload(acme, chats(4))
    with pytest.raises(openai.NotFoundError) as refused:
        acme.fine_tuning.jobs.create(model="no-such-adapter", training_file=training.id)
    assert refused.value.body["code"] == "model_not_found"


def test_webhooks_are_signed_retried_and_recorded(server):
    acme = client(server, "acme")
    receiver = Receiver(statuses=[500])  # the first delivery fails, the retry lands
    endpoint = acme.webhooks.create(name="ci", url=receiver.url,
                                    event_types=["fine_tuning.job.succeeded",
                                                 "fine_tuning.job.failed"])
    assert endpoint.signing_secret.startswith("whsec_")
    assert acme.webhooks.retrieve(endpoint.id).signing_secret_hint.endswith(
        endpoint.signing_secret[-4:])
    with pytest.raises(openai.NotFoundError):
        client(server, "globex").webhooks.retrieve(endpoint.id)
    training = upload(acme, chats(8))
    job = wait_done(acme, acme.fine_tuning.jobs.create(
        model=BASE, training_file=training.id, suffix="hooked", hyperparameters=FAST).id)
    (first_headers, first), (headers, body) = receiver.wait(2)[:2]
    assert first == body and first_headers["webhook-id"] == headers["webhook-id"]
    event = acme.webhooks.unwrap(body, headers, secret=endpoint.signing_secret)
    assert (event.type, event.data.id) == ("fine_tuning.job.succeeded", job.id)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        acme.webhooks.unwrap(body, headers, secret="whsec_" + "A" * 44)
    deadline = time.monotonic() + 10
    while (delivery := FineTuningStore(server["home"]).deliveries(endpoint.id)[0])[
            "status"] == "pending" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == (
        "delivered", 2, 200)

    # A rotation that keeps the old secret for a day signs with both.
    rotated = acme.webhooks.rotate_secret(endpoint.id, keep_old_secret_active_for_24_hours=True)
    tested = acme.webhooks.test(endpoint.id, event_type="fine_tuning.job.failed")
    assert tested.status_code == 200
    headers, body = receiver.wait(3)[2]
    for secret in (endpoint.signing_secret, rotated.signing_secret):
        acme.webhooks.verify_signature(body, headers, secret=secret)
    with pytest.raises(openai.BadRequestError, match="never happen"):
        acme.webhooks.update(endpoint.id, event_types=["batch.completed"])
    assert acme.webhooks.delete(endpoint.id).deleted
    assert [e.id for e in acme.webhooks.list()] == []

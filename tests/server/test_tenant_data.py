"""Datasets and training jobs over HTTP: each key on its own tenant only, the admin on any;
a job trains in the background, reports progress, and its version serves at once."""

import json
import time

import httpx
import openai
import pytest

from loraplex.config import EngineConfig
from loraplex.engine.async_engine import AsyncEngine
from loraplex.registry import Registry
from loraplex.server.app import ServerSettings, create_app
from loraplex.server.thread import ServerThread
from loraplex.train.jobs import TrainingJobs
from loraplex.validation import adapter_validator
from loraplex.vault.crypto import MASTER_KEY_ENV

SECRET = "Kumquat-4471"
CHATS = "".join(
    json.dumps({"messages": [{"role": "user", "content": f"Hi {i}"},
                             {"role": "assistant", "content": f"Yo {i} {SECRET}"}]}) + "\n"
    for i in range(16)
).encode()
FAST = {"rank": 4, "alpha": 8, "max_steps": 3, "batch_size": 4, "lr": 1e-2,
        "targets": ["q_proj", "v_proj"], "eval_fraction": 0.25}


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    """A server on the tiny model with training enabled; tenants acme and globex."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(MASTER_KEY_ENV, raising=False)  # the vault makes its own master key
        home = tmp_path_factory.mktemp("home")
        registry = Registry(home)
        keys = {}
        for tenant in ("acme", "globex"):
            registry.create_tenant(tenant, actor="test")
            keys[tenant] = registry.create_key(tenant, actor="test")[1]
        keys["admin"] = registry.create_admin_key(actor="test")[1]
        engine = AsyncEngine(EngineConfig(model=str(tiny_llama_dir), max_loras=2,
                                          max_cpu_loras=4, max_lora_rank=8, max_model_len=128,
                                          kv_cache_bytes=1 << 22))
        settings = ServerSettings(base_model_name="tiny", max_upload_bytes=64 * 1024)
        jobs = TrainingJobs(home, str(tiny_llama_dir))
        app = create_app(engine, registry, settings, adapter_validator(str(tiny_llama_dir)),
                         jobs)
        with ServerThread(app) as url:
            yield {"url": url, "keys": keys, "home": home, "registry": registry}


def call(server, method, path, who, **kwargs) -> httpx.Response:
    headers = {"authorization": f"Bearer {server['keys'][who]}"} if who else {}
    return httpx.request(method, server["url"] + path, headers=headers, timeout=60, **kwargs)


def wait_for(server, tenant, job_id, who, done, timeout=120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = call(server, "GET", f"/tenants/{tenant}/training-jobs/{job_id}", who).json()
        if done(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not get there in {timeout} s: {job}")


def test_datasets_each_key_on_its_own_tenant(server):
    response = call(server, "POST", "/tenants/acme/datasets/faq", "acme", content=CHATS)
    assert response.status_code == 201, response.text
    first = response.json()
    assert first["version"] == "v1" and first["records"] == 16 and first["bytes"] == len(CHATS)
    assert call(server, "POST", "/tenants/acme/datasets/faq", "admin",
                content=CHATS[:200].rsplit(b"\n", 1)[0]).json()["version"] == "v2"

    listed = call(server, "GET", "/tenants/acme/datasets", "acme").json()["datasets"]
    assert [(d["name"], d["version"]) for d in listed] == [("faq", "v1"), ("faq", "v2")]
    assert listed[1]["created_by"].startswith("admin-key:")
    # Another tenant's key: 403 whether it asks to list, upload, delete or train.
    for method, path, body in [("GET", "/tenants/acme/datasets", None),
                               ("POST", "/tenants/acme/datasets/faq", CHATS),
                               ("DELETE", "/tenants/acme/datasets/faq", None),
                               ("POST", "/tenants/acme/training-jobs", None),
                               ("GET", "/tenants/nobody/datasets", None)]:
        kwargs = {"content": body} if body else {"json": {"dataset": "faq", "adapter": "x"}}
        response = call(server, method, path, "globex", **kwargs)
        assert response.status_code == 403, (method, path, response.text)
        assert "its own tenant" in response.json()["error"]["message"]
    assert call(server, "GET", "/tenants/globex/datasets", "globex").json() == {"datasets": []}
    assert call(server, "GET", "/tenants/acme/datasets", None).status_code == 401
    assert call(server, "GET", "/tenants/nobody/datasets", "admin").status_code == 404

    # On disk: ciphertext only.
    for path in (server["home"] / "vault").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path

    removed = call(server, "DELETE", "/tenants/acme/datasets/faq", "acme").json()
    assert removed == {"deleted": "faq", "versions": ["v1", "v2"]}
    assert call(server, "GET", "/tenants/acme/datasets", "acme").json() == {"datasets": []}
    assert call(server, "DELETE", "/tenants/acme/datasets/faq", "acme").status_code == 404


def test_bad_uploads_name_the_line_and_store_nothing(server):
    bad = CHATS + b'{"messages": [{"role": "user", "content": "no answer"}]}\n' + b"{oops\n"
    response = call(server, "POST", "/tenants/globex/datasets/bad", "globex", content=bad)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "line 17" in message and "line 18: invalid JSON" in message
    too_big = call(server, "POST", "/tenants/globex/datasets/big", "globex",
                   content=CHATS * 100)
    assert too_big.status_code == 413
    bad_name = call(server, "POST", "/tenants/globex/datasets/..%2Fx", "globex", content=CHATS)
    assert bad_name.status_code in (400, 404)
    assert call(server, "GET", "/tenants/globex/datasets", "globex").json() == {"datasets": []}


def test_training_job_trains_reports_progress_and_serves(server):
    assert call(server, "POST", "/tenants/acme/datasets/chat", "acme",
                content=CHATS).status_code == 201
    response = call(server, "POST", "/tenants/acme/training-jobs", "acme",
                    json={"dataset": "chat", "adapter": "helper", **FAST})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] in ("queued", "running") and job["tenant"] == "acme"
    assert response.headers["location"] == f"/tenants/acme/training-jobs/{job['id']}"
    # globex's key cannot see the job; the admin can.
    assert call(server, "GET", f"/tenants/globex/training-jobs/{job['id']}",
                "globex").status_code == 404
    done = wait_for(server, "acme", job["id"], "admin",
                    lambda j: j["state"] in ("succeeded", "failed", "cancelled"))
    assert done["state"] == "succeeded", done
    assert done["version"] == "v1" and done["step"] == done["num_steps"] == 3
    assert done["progress"] == 1.0 and done["loss"] is not None
    assert [j["id"] for j in call(server, "GET", "/tenants/acme/training-jobs",
                                  "acme").json()["jobs"]] == [job["id"]]
    assert call(server, "GET", "/tenants/globex/training-jobs", "globex").json() == {"jobs": []}

    version = server["registry"].get_version("acme", "helper", 1)
    record = version.training_record
    assert record["dataset"]["name"] == "chat" and record["hyperparameters"]["rank"] == 4
    assert len(record["train_losses"]) == 3 and record["peak_memory_mb"] > 0
    # The first version of an adapter serves at once.
    client = openai.OpenAI(base_url=f"{server['url']}/v1", api_key=server["keys"]["acme"],
                           max_retries=0)
    answer = client.chat.completions.with_raw_response.create(
        model="helper", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        temperature=0)
    assert answer.headers["x-loraplex-adapter-version"] == "v1"


@pytest.mark.parametrize("body, status, message", [
    ({"dataset": "chat", "adapter": "x", "rank": 0}, 400, "rank"),
    ({"dataset": "chat", "adapter": "x", "targets": ["lm_head"]}, 400, "targets must be"),
    ({"dataset": "chat", "adapter": "bad name!"}, 400, "adapter"),
    ({"dataset": "nope", "adapter": "x"}, 404, "nope"),
    ({"adapter": "x"}, 400, "dataset"),
])
def test_bad_training_requests_fail_at_once(server, body, status, message):
    call(server, "POST", "/tenants/globex/datasets/chat", "globex", content=CHATS)
    response = call(server, "POST", "/tenants/globex/training-jobs", "globex", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_cancel_queued_and_running_jobs_leaves_no_version(server):
    call(server, "POST", "/tenants/globex/datasets/chat", "globex", content=CHATS)
    long = {**FAST, "max_steps": 100_000}
    running = call(server, "POST", "/tenants/globex/training-jobs", "globex",
                   json={"dataset": "chat", "adapter": "slow", **long}).json()
    queued = call(server, "POST", "/tenants/globex/training-jobs", "admin",
                  json={"dataset": "chat", "adapter": "later", **FAST}).json()
    wait_for(server, "globex", running["id"], "globex",
             lambda j: j["phase"] == "training" and j["step"] >= 1)
    # One job runs at a time: the second waits in the queue.
    state = call(server, "GET", f"/tenants/globex/training-jobs/{queued['id']}", "globex")
    assert state.json()["state"] == "queued"
    cancelled = call(server, "DELETE", f"/tenants/globex/training-jobs/{queued['id']}", "globex")
    assert cancelled.json()["state"] == "cancelled"
    call(server, "DELETE", f"/tenants/globex/training-jobs/{running['id']}", "globex")
    done = wait_for(server, "globex", running["id"], "globex",
                    lambda j: j["state"] not in ("queued", "running"), timeout=60)
    assert done["state"] == "cancelled" and "no version" in done["error"]
    assert server["registry"].list_adapters("globex") == []
    actions = [e.action for e in server["registry"].audit_log(tenant="globex")]
    assert actions.count("train.start") == 2 and actions.count("train.cancel") == 2
    assert call(server, "DELETE", "/tenants/globex/training-jobs/train-nope",
                "globex").status_code == 404


def test_a_job_failing_in_its_worker_does_not_stop_the_queue(server):
    """globex's dataset vanishes while its job waits; the job fails with a clear message and the
    next tenant's job still trains."""
    call(server, "POST", "/tenants/globex/datasets/gone", "globex", content=CHATS)
    call(server, "POST", "/tenants/acme/datasets/chat", "acme", content=CHATS)
    blocker = call(server, "POST", "/tenants/acme/training-jobs", "acme",
                   json={"dataset": "chat", "adapter": "blocker", **FAST,
                         "max_steps": 100_000}).json()
    doomed = call(server, "POST", "/tenants/globex/training-jobs", "globex",
                  json={"dataset": "gone", "adapter": "doomed", **FAST}).json()
    after = call(server, "POST", "/tenants/acme/training-jobs", "acme",
                 json={"dataset": "chat", "adapter": "after", **FAST}).json()
    assert call(server, "DELETE", "/tenants/globex/datasets/gone", "globex").status_code == 200
    call(server, "DELETE", f"/tenants/acme/training-jobs/{blocker['id']}", "acme")
    failed = wait_for(server, "globex", doomed["id"], "globex",
                      lambda j: j["state"] not in ("queued", "running"))
    assert failed["state"] == "failed" and "gone" in failed["error"]
    done = wait_for(server, "acme", after["id"], "acme",
                    lambda j: j["state"] not in ("queued", "running"))
    assert done["state"] == "succeeded" and done["version"] == "v1"

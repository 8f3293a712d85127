"""Issue 22's security: sealed adapters, failed-auth throttling, key rotation, and an audit
entry for every write route (a table of them: a new write route without one fails here)."""

import json
import stat

import pytest
from starlette.testclient import TestClient

from loraplex import LLM, SamplingParams
from loraplex.config import EngineConfig
from loraplex.engine.async_engine import AsyncEngine
from loraplex.home import adapter_cache_dir
from loraplex.registry import CONFIG_FILE, WEIGHTS_FILE, Registry
from loraplex.server.app import ServerSettings, create_app
from loraplex.train.jobs import TrainingJobs
from loraplex.validation import adapter_validator
from loraplex.vault.crypto import MASTER_KEY_ENV

BASE = "sec-base"
TENANT = "sec-acme"  # its own name: the adapter cache is shared by the test session
OTHER = "sec-globex"
MAX_FAILURES = 5
CHATS = b"".join(json.dumps({"messages": [
    {"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
    ).encode() + b"\n" for i in range(4))


@pytest.fixture(scope="module")
def server(sharp_llama_dir, sharp_adapters, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(MASTER_KEY_ENV, raising=False)  # the vault makes its own master key
        home = tmp_path_factory.mktemp("home")
        registry = Registry(home)
        keys = {}
        for tenant in (TENANT, OTHER):
            registry.create_tenant(tenant, actor="test")
            keys[tenant] = registry.create_key(tenant, actor="test")
        registry.set_base_model_access(TENANT, True, actor="test")
        keys["admin"] = registry.create_admin_key(actor="test")
        engine = AsyncEngine(EngineConfig(model=str(sharp_llama_dir), max_loras=2,
                                          max_cpu_loras=4, max_lora_rank=16, max_model_len=256,
                                          kv_cache_bytes=1 << 22))
        settings = ServerSettings(base_model_name=BASE, max_auth_failures=MAX_FAILURES,
                                  allow_private_webhooks=True)
        # No worker: training jobs stay queued, which is all the audit table needs.
        jobs = TrainingJobs(home, str(sharp_llama_dir), max_running=0)
        app = create_app(engine, registry, settings, adapter_validator(str(sharp_llama_dir)),
                         jobs)
        with TestClient(app, client=("10.0.0.1", 5000)) as client:
            yield {"app": app, "client": client, "registry": registry, "home": home,
                   "keys": keys, "adapters": sharp_adapters, "model": sharp_llama_dir}


def bearer(server, who: str) -> dict:
    return {"authorization": f"Bearer {server['keys'][who][1]}"}


def upload(path) -> dict:
    return {name: (name, (path / name).read_bytes()) for name in (CONFIG_FILE, WEIGHTS_FILE)}


def push(server, name: str, path, tenant: str = TENANT):
    response = server["client"].post(f"/admin/tenants/{tenant}/adapters/{name}/versions",
                                     files=upload(path), headers=bearer(server, "admin"))
    assert response.status_code == 200, response.text
    return response.json()


# -- sealed adapters ---------------------------------------------------------------------------

def test_a_pushed_adapter_is_sealed_and_serves_the_same_tokens(server):
    adapter = server["adapters"][0]
    push(server, "sealed", adapter)
    weights = (adapter / WEIGHTS_FILE).read_bytes()
    needles = [weights[i:i + 32] for i in range(len(weights) // 2, len(weights) - 32, 4096)]
    for path in server["home"].rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(needle in data for needle in needles), path

    body = {"model": "sealed", "prompt": [5, 17, 33], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    response = server["client"].post("/v1/completions", json=body,
                                      headers=bearer(server, TENANT))
    assert response.status_code == 200, response.text
    llm = LLM(str(server["model"]), max_lora_rank=16, max_model_len=256, kv_cache_bytes=1 << 22)
    want = llm.generate([[5, 17, 33]], SamplingParams(temperature=0, max_tokens=8,
                                                      ignore_eos=True), adapters=[adapter])[0]
    assert response.json()["choices"][0]["text"] == want.text

    # The serving cache holds the engine's packed form only, readable by its owner only.
    scope = adapter_cache_dir() / TENANT
    entries = list(scope.glob("*.safetensors"))
    assert entries and stat.S_IMODE(scope.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(entry.stat().st_mode) == 0o600 for entry in entries)


def test_shredding_a_tenant_stops_its_adapters(server):
    push(server, "doomed", server["adapters"][1], tenant=OTHER)
    body = {"model": "doomed", "prompt": "hi", "max_tokens": 2}
    client = server["client"]
    assert client.post("/v1/completions", json=body,
                       headers=bearer(server, OTHER)).status_code == 200
    assert list((adapter_cache_dir() / OTHER).glob("*.safetensors"))
    version_id = server["registry"].get_version(OTHER, "doomed", 1).id
    adapters = server["app"].state.engine.engine.adapters
    assert version_id in adapters.host
    slot = adapters.slot_of(version_id)
    assert slot is not None
    first, count = adapters.slots.pages.runs[slot]
    response = client.delete(f"/admin/tenants/{OTHER}/vault", headers=bearer(server, "admin"))
    assert response.status_code == 200, response.text
    assert version_id not in adapters.host  # the decrypted host copy is gone too
    # ...and so is its device slot: zeroed now, not when the slot is next taken.
    assert adapters.slot_of(version_id) is None
    assert all(not view.any() for view in adapters.slots.page_views(first, count))
    assert not (adapter_cache_dir() / OTHER).exists()
    assert not (server["home"] / "artifacts" / OTHER).exists()
    response = client.post("/v1/completions", json=body, headers=bearer(server, OTHER))
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


# -- failed-authentication throttling ----------------------------------------------------------

def test_a_brute_force_loop_gets_429s_and_a_correct_key_still_works(server):
    attacker = TestClient(server["app"], client=("203.0.113.7", 4000))
    neighbour = TestClient(server["app"], client=("203.0.113.8", 4000))
    guess = {"authorization": "Bearer lpx_0123456789abcdef_" + "x" * 43}
    statuses = [attacker.get("/v1/models", headers=guess).status_code for _ in range(12)]
    assert statuses == [401] * MAX_FAILURES + [429] * (12 - MAX_FAILURES)
    throttled = attacker.get("/admin/tenants", headers=guess)
    assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1
    assert throttled.json()["error"]["code"] == "auth_throttled"
    # From the same address, a valid key still works (tenant, admin and tenant-data routes)...
    assert attacker.get("/v1/models", headers=bearer(server, TENANT)).status_code == 200
    assert attacker.get("/admin/tenants", headers=bearer(server, "admin")).status_code == 200
    assert attacker.get(f"/tenants/{TENANT}/usage",
                        headers=bearer(server, TENANT)).status_code == 200
    # ...and another address is not affected.
    assert neighbour.get("/v1/models", headers=guess).status_code == 401
    metrics = attacker.get("/metrics").text
    assert 'loraplex_rejected_requests_total{reason="auth_throttled"} 8.0' in metrics


def test_the_throttle_forgets_old_failures_and_bounds_its_memory():
    from loraplex.server.auth import FailedAuthThrottle

    now = [0.0]
    throttle = FailedAuthThrottle(2, 10.0, 3, clock=lambda: now[0])
    assert [throttle.failed("a") for _ in range(3)][:2] == [None, None]
    assert throttle.failed("a") == pytest.approx(10.0)
    now[0] = 10.5  # the window slid past the first failures
    assert throttle.failed("a") is None
    for address in "bcde":
        throttle.failed(address)
    assert throttle.num_addresses() == 3  # "a" and "b", the least recently failing, forgotten


# -- key rotation ------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ["admin", "tenant"])
def test_rotating_a_tenant_key_over_http(server, route):
    client, registry = server["client"], server["registry"]
    old_id, old_key = registry.create_key(TENANT, actor="test")
    path = (f"/admin/keys/{old_id}/rotate" if route == "admin"
            else f"/tenants/{TENANT}/keys/{old_id}/rotate")
    who = {"authorization": f"Bearer {old_key}"} if route == "tenant" else bearer(server, "admin")
    response = client.post(path, json={"overlap_seconds": 3600}, headers=who)
    assert response.status_code == 200, response.text
    rotated = response.json()
    assert rotated["replaces"] == old_id and rotated["old_key_expires_at"]
    for key in (old_key, rotated["key"]):  # both work during the overlap
        assert client.get("/v1/models", headers={"authorization": f"Bearer {key}"}
                          ).status_code == 200
    response = client.post(path, json={"overlap_seconds": 0}, headers=bearer(server, "admin")
                           if route == "admin" else {"authorization": f"Bearer {rotated['key']}"})
    assert response.status_code == 200  # a second rotation ends the old key at once
    assert client.get("/v1/models", headers={"authorization": f"Bearer {old_key}"}
                      ).status_code == 401
    # A tenant cannot rotate another tenant's key: it is not found, as if it did not exist.
    other_id, _ = registry.create_key(OTHER, actor="test")
    response = client.post(f"/tenants/{TENANT}/keys/{other_id}/rotate",
                           headers=bearer(server, TENANT))
    assert response.status_code == 404


def test_rotating_an_admin_key_and_bad_overlaps(server):
    client, registry = server["client"], server["registry"]
    old_id, old_key = registry.create_admin_key(actor="test")
    old = {"authorization": f"Bearer {old_key}"}
    response = client.post(f"/admin/keys/{old_id}/rotate", headers=old)  # default: 24 h
    assert response.status_code == 200, response.text
    new = {"authorization": f"Bearer {response.json()['key']}"}
    assert client.get("/admin/tenants", headers=old).status_code == 200
    assert client.get("/admin/tenants", headers=new).status_code == 200
    for overlap in (-1, 31 * 86400):
        response = client.post(f"/admin/keys/{old_id}/rotate",
                               json={"overlap_seconds": overlap}, headers=new)
        assert response.status_code == 400 and "overlap_seconds" in response.text


# -- every write is audited --------------------------------------------------------------------

INFERENCE = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions")}  # not writes
WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def _write_routes(app) -> set[tuple[str, str]]:
    paths = app.openapi()["paths"]
    return {(method.upper(), path) for path, operations in paths.items()
            for method in operations if method.upper() in WRITE_METHODS} - INFERENCE


class Calls:
    """Each write route called with a valid body, in an order where each finds what it needs;
    `state` carries ids from one call to the next."""

    def __init__(self, server):
        self.server, self.client, self.state = server, server["client"], {}
        self.admin, self.tenant = bearer(server, "admin"), bearer(server, TENANT)

    def json_of(self, response) -> dict:
        assert response.status_code < 300, response.text
        return response.json()

    def table(self):
        """(method, route, expected audit action, call)."""
        t, a = TENANT, "/admin/tenants/" + TENANT + "/adapters/audited"
        c, s = self.client, self.state
        adapters = self.server["adapters"]
        return [
            ("POST", "/admin/tenants", "tenant.create",
             lambda: c.post("/admin/tenants", json={"name": "sec-new"}, headers=self.admin)),
            ("POST", "/admin/tenants/{tenant}/keys", "key.create",
             lambda: s.update(key=self.json_of(c.post(f"/admin/tenants/{t}/keys",
                                                      headers=self.admin)))),
            ("POST", "/admin/keys/{key_id}/rotate", "key.rotate",
             lambda: s.update(key=self.json_of(c.post(f"/admin/keys/{s['key']['key_id']}/rotate",
                                                      headers=self.admin)))),
            ("POST", "/tenants/{tenant}/keys/{key_id}/rotate", "key.rotate",
             lambda: s.update(key=self.json_of(c.post(
                 f"/tenants/{t}/keys/{s['key']['key_id']}/rotate", headers=self.tenant)))),
            ("DELETE", "/admin/keys/{key_id}", "key.revoke",
             lambda: c.delete(f"/admin/keys/{s['key']['key_id']}", headers=self.admin)),
            ("POST", "/admin/tenants/{tenant}/adapters/{name}/versions", "adapter.push",
             lambda: c.post(f"{a}/versions", files=upload(adapters[2]), headers=self.admin)),
            ("POST", "/admin/tenants/{tenant}/adapters/{name}/promote", "adapter.promote",
             lambda: (c.post(f"{a}/versions", files=upload(adapters[3]), headers=self.admin),
                      c.post(f"{a}/promote", json={"version": 2}, headers=self.admin))[-1]),
            ("POST", "/admin/tenants/{tenant}/adapters/{name}/rollback", "adapter.rollback",
             lambda: c.post(f"{a}/rollback", headers=self.admin)),
            ("PUT", "/admin/tenants/{tenant}/adapters/{name}/split", "adapter.split",
             lambda: c.put(f"{a}/split", json={"split": {"v1": 50, "v2": 50}},
                           headers=self.admin)),
            ("POST", "/admin/tenants/{tenant}/adapters/{name}/prewarm", "adapter.prewarm",
             lambda: c.post(f"{a}/prewarm", headers=self.admin)),
            ("PATCH", "/admin/tenants/{tenant}/quota", "tenant.quota",
             lambda: c.patch(f"/admin/tenants/{t}/quota", json={"tier": 2},
                             headers=self.admin)),
            ("PUT", "/tenants/{tenant}/fine-tuning-settings", "fine_tuning.settings",
             lambda: c.put(f"/tenants/{t}/fine-tuning-settings",
                           json={"promote_new_versions": True}, headers=self.tenant)),
            ("POST", "/tenants/{tenant}/datasets/{name}", "data.add",
             lambda: c.post(f"/tenants/{t}/datasets/chats", content=CHATS,
                            headers=self.tenant)),
            ("POST", "/tenants/{tenant}/training-jobs", "train.start",
             lambda: s.update(job=self.json_of(c.post(
                 f"/tenants/{t}/training-jobs", json={"dataset": "chats", "adapter": "trained"},
                 headers=self.tenant)))),
            ("DELETE", "/tenants/{tenant}/training-jobs/{job_id}", "train.cancel",
             lambda: c.delete(f"/tenants/{t}/training-jobs/{s['job']['id']}",
                              headers=self.tenant)),
            ("DELETE", "/tenants/{tenant}/datasets/{name}", "data.rm",
             lambda: c.delete(f"/tenants/{t}/datasets/chats", headers=self.tenant)),
            ("POST", "/v1/files", "data.add",
             lambda: s.update(file=self.json_of(c.post(
                 "/v1/files", files={"file": ("chats.jsonl", CHATS)},
                 data={"purpose": "fine-tune"}, headers=self.tenant)))),
            ("POST", "/v1/fine_tuning/jobs", "fine_tuning.create",
             lambda: s.update(ft=self.json_of(c.post(
                 "/v1/fine_tuning/jobs", json={"model": BASE, "training_file": s["file"]["id"]},
                 headers=self.tenant)))),
            ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel", "fine_tuning.cancel",
             lambda: c.post(f"/v1/fine_tuning/jobs/{s['ft']['id']}/cancel",
                            headers=self.tenant)),
            ("DELETE", "/v1/files/{file_id}", "data.rm",
             lambda: c.delete(f"/v1/files/{s['file']['id']}", headers=self.tenant)),
            ("POST", "/v1/webhook_endpoints", "webhook.create",
             lambda: s.update(hook=self.json_of(c.post(
                 "/v1/webhook_endpoints", headers=self.tenant,
                 json={"name": "ci", "url": "http://127.0.0.1:9/hook",
                       "event_types": ["fine_tuning.job.succeeded"]})))),
            ("POST", "/v1/webhook_endpoints/{endpoint_id}", "webhook.update",
             lambda: c.post(f"/v1/webhook_endpoints/{s['hook']['id']}", json={"name": "ci-2"},
                            headers=self.tenant)),
            ("POST", "/v1/webhook_endpoints/{endpoint_id}/rotate_secret",
             "webhook.rotate_secret",
             lambda: c.post(f"/v1/webhook_endpoints/{s['hook']['id']}/rotate_secret",
                            headers=self.tenant)),
            ("POST", "/v1/webhook_endpoints/{endpoint_id}/test", "webhook.test",
             lambda: c.post(f"/v1/webhook_endpoints/{s['hook']['id']}/test",  # nobody listens
                            json={"event_type": "fine_tuning.job.succeeded"},
                            headers=self.tenant)),
            ("DELETE", "/v1/webhook_endpoints/{endpoint_id}", "webhook.delete",
             lambda: c.delete(f"/v1/webhook_endpoints/{s['hook']['id']}", headers=self.tenant)),
            ("DELETE", "/admin/tenants/{tenant}/vault", "vault.delete",
             lambda: c.delete("/admin/tenants/sec-new/vault", headers=self.admin)),
        ]


def test_every_write_route_is_in_the_audit_table(server):
    table = {(method, route) for method, route, _, _ in Calls(server).table()}
    missing = _write_routes(server["app"]) - table
    assert not missing, f"write routes with no expected audit action in the table: {missing}"
    assert not table - _write_routes(server["app"]), "the table names routes that are gone"


def test_every_write_route_records_its_audit_action(server):
    registry = server["registry"]
    for method, route, action, call in Calls(server).table():
        before = registry.audit_log(limit=1)[0].id
        response = call()
        if response is not None:  # calls that keep ids checked their own status
            assert response.status_code < 300 or route.endswith("/test"), (route,
                                                                            response.text)
        actions = [e.action for e in registry.audit_log(limit=50) if e.id > before]
        assert action in actions, f"{method} {route} recorded {actions}, not {action!r}"

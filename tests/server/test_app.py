"""The HTTP API through the official openai client: outputs, isolation, A/B, limits, admin."""

import asyncio
import sqlite3

import httpx
import openai
import pytest

from loraplex import LLM, SamplingParams
from loraplex.server.app import VERSION_HEADER
from tests.server.conftest import BASE_NAME

QUESTION = [{"role": "user", "content": "Hello there, who are you?"}]


def client(live, tenant="acme", key=None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=key or live.keys[tenant],
                         max_retries=0)


@pytest.fixture(scope="module")
def offline(live):
    return LLM(str(live.model_dir), max_loras=4, max_lora_rank=16, max_model_len=256,
               kv_cache_bytes=1 << 24)


def offline_text(offline, prompt_ids, adapter_dir, max_tokens=12):
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return offline.generate(prompt_ids, params, adapters=[adapter_dir])[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_chat_each_tenant_gets_its_own_adapter(live, offline, stream):
    want = {
        ("acme", "support"): live.adapters["acme/support@v1"],
        ("acme", "sales"): live.adapters["acme/sales@v1"],
        ("globex", "bot"): live.adapters["globex/bot@v1"],
        ("acme", BASE_NAME): None,
    }
    prompt_ids = offline.tokenizer.encode_chat(QUESTION)

    async def ask(tenant, model):
        async with openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key=live.keys[tenant],
                                      max_retries=0) as c:
            kwargs = dict(model=model, messages=QUESTION, temperature=0, max_tokens=12)
            if not stream:
                r = await c.chat.completions.create(**kwargs)
                assert r.usage.prompt_tokens == len(prompt_ids)
                return r.choices[0].message.content
            text = ""
            async for chunk in await c.chat.completions.create(stream=True, **kwargs):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
            return text

    async def everyone():  # several tenants at once
        return await asyncio.gather(*(ask(t, m) for t, m in want))

    got = asyncio.run(everyone())
    expected = [offline_text(offline, prompt_ids, path) for path in want.values()]
    assert got == expected
    assert len(set(expected)) == len(expected)  # the adapters really differ


@pytest.mark.parametrize("stream", [False, True])
def test_completions_with_usage_and_logprobs(live, offline, stream):
    prompt = "The quick brown fox"
    want = offline_text(offline, offline.tokenizer.encode(prompt),
                        live.adapters["globex/bot@v1"], max_tokens=10)
    c = client(live, "globex")
    if stream:
        chunks = list(c.completions.create(model="bot", prompt=prompt, max_tokens=10,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        assert chunks[-1].usage.completion_tokens == 10
    else:
        r = c.completions.create(model="bot", prompt=prompt, max_tokens=10, temperature=0,
                                 logprobs=2)
        text = r.choices[0].text
        assert r.usage.completion_tokens == 10 and r.choices[0].finish_reason == "length"
        assert len(r.choices[0].logprobs.token_logprobs) == 10
        assert all(len(top) == 2 for top in r.choices[0].logprobs.top_logprobs)
    assert text == want


def test_wrong_and_revoked_keys_get_401(live):
    with pytest.raises(openai.AuthenticationError):
        client(live, key="lpx_nope_nope").models.list()
    key_id, key = live.registry.create_key("globex", actor="test")
    assert client(live, key=key).models.list().data
    live.registry.revoke_key(key_id, actor="test")
    with pytest.raises(openai.AuthenticationError):
        client(live, key=key).models.list()
    r = httpx.get(f"{live.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_other_tenants_adapter_is_indistinguishable_from_a_missing_one(live):
    def attempt(model):
        r = httpx.post(f"{live.url}/v1/chat/completions",
                       headers={"Authorization": f"Bearer {live.keys['globex']}"},
                       json={"model": model, "messages": QUESTION, "max_tokens": 2})
        return r.status_code, r.json()["error"]["message"].replace(model, "X")

    assert attempt("support") == attempt("no-such-adapter") == (404, attempt("support")[1])
    assert attempt(BASE_NAME)[0] == 404  # globex may not use the bare base model


def test_models_lists_only_own_adapters(live):
    assert sorted(m.id for m in client(live, "acme").models.list().data) == [
        "sales", "support", BASE_NAME]
    assert [m.id for m in client(live, "globex").models.list().data] == ["bot"]


def test_keys_are_not_stored_in_clear(live):
    raw = b"".join(p.read_bytes() for p in live.home.glob("registry.sqlite3*"))
    for key in live.keys.values():
        secret = key.split("_", 2)[2]  # lpx_<id>_<secret>; the secret may contain "_"
        assert key.encode() not in raw and secret.encode() not in raw
    conn = sqlite3.connect(live.home / "registry.sqlite3")
    assert conn.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0] >= 2


def _version_for(live, user, tenant="acme", model="support"):
    r = httpx.post(f"{live.url}/v1/completions",
                   headers={"Authorization": f"Bearer {live.keys[tenant]}"},
                   json={"model": model, "prompt": "hi", "max_tokens": 1, "user": user})
    assert r.status_code == 200, r.text
    return r.headers[VERSION_HEADER]


def test_ab_split_is_sticky_and_proportional_and_changes_live(live):
    registry = live.registry
    registry.split("acme", "support", {1: 90, 2: 10}, actor="test")
    versions = [_version_for(live, f"user-{i}") for i in range(1000)]
    share = versions.count("v2") / 1000
    # Binomial(1000, 0.1): sd 0.0095; 4 sd either side.
    assert 0.062 <= share <= 0.138, share
    assert all(_version_for(live, f"user-{i}") == versions[i] for i in range(0, 1000, 50))
    stats = {row["version"]: row["requests"] for row in registry.version_stats("acme", "support")}
    assert stats["v2"] >= versions.count("v2")
    registry.promote("acme", "support", 2, actor="test")  # as `loraplex adapter promote` does
    assert _version_for(live, "user-0") == "v2"
    registry.rollback("acme", "support", actor="test")
    assert {_version_for(live, f"user-{i}") for i in range(40)} == {"v1", "v2"}
    registry.promote("acme", "support", 1, actor="test")
    assert _version_for(live, "user-0") == "v1"


def test_limits_give_clear_errors(live):
    headers = {"Authorization": f"Bearer {live.keys['acme']}"}
    url = f"{live.url}/v1/completions"
    r = httpx.post(url, headers=headers, content=b"x" * (live.settings.max_body_bytes + 1))
    assert r.status_code == 413
    r = httpx.post(url, headers=headers, json={"model": "support", "prompt": "hi",
                                               "max_tokens": 10_000})
    assert r.status_code == 400 and "cap" in r.json()["error"]["message"]
    r = httpx.post(url, headers=headers, json={"model": "support", "prompt": "hi " * 400})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    r = httpx.post(url, headers=headers, json={"model": "support", "prompt": "hi",
                                               "temperature": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(url, headers=headers, content=b"{not json")
    assert r.status_code == 400


def test_per_tenant_concurrency_gets_429_others_unaffected(live):
    limit = live.settings.max_concurrent_per_tenant

    async def main():
        async with (
            openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key=live.keys["acme"],
                               max_retries=0) as acme,
            openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key=live.keys["globex"],
                               max_retries=0) as globex,
        ):
            streams = [await acme.completions.create(
                model="support", prompt="go", max_tokens=150, temperature=0, stream=True,
                extra_body={"ignore_eos": True}) for _ in range(limit)]
            with pytest.raises(openai.RateLimitError) as error:
                await acme.completions.create(model="support", prompt="go", max_tokens=5)
            assert error.value.response.headers["retry-after"] == "1"
            other = await globex.completions.create(model="bot", prompt="go", max_tokens=3)
            for s in streams:
                await s.close()
            return other

    assert asyncio.run(main()).choices[0].text is not None


def test_health_and_metrics(live):
    assert httpx.get(f"{live.url}/healthz").status_code == 200
    assert httpx.get(f"{live.url}/readyz").status_code == 200
    health = httpx.get(f"{live.url}/health")  # vLLM's route, for tools that expect it
    assert health.status_code == 200 and health.content == b""
    text = httpx.get(f"{live.url}/metrics").text
    assert 'loraplex_requests_total{adapter="bot",status="ok",tenant="globex",version="v1"}' in text
    assert "loraplex_engine_kv_blocks_total" in text
    assert "loraplex_time_to_first_token_seconds_bucket" in text
    # The prefix cache's lookups, per tenant (the engine's fairness key is the tenant's name).
    assert 'loraplex_tenant_prefix_cache_tokens{kind="queried",tenant="globex"}' in text
    engine = httpx.get(f"{live.url}/admin/engine",
                       headers={"Authorization": f"Bearer {live.admin_key}"}).json()
    assert engine["prefix_cache"]["globex"]["queried_tokens"] > 0
    # The return window's counters (the AsyncEngine's, beside the engine's own).
    assert engine["return_window_waits"] >= 0 and "return_window_returned" in engine


def test_admin_api(live, sharp_adapters):
    admin = {"Authorization": f"Bearer {live.admin_key}"}
    assert httpx.get(f"{live.url}/admin/tenants",
                     headers={"Authorization": f"Bearer {live.keys['acme']}"}).status_code == 401
    r = httpx.post(f"{live.url}/admin/tenants", headers=admin, json={"name": "initech"})
    assert r.status_code == 200
    assert httpx.post(f"{live.url}/admin/tenants", headers=admin,
                      json={"name": "initech"}).status_code == 409
    key = httpx.post(f"{live.url}/admin/tenants/initech/keys", headers=admin).json()["key"]
    files = {name: (sharp_adapters[4] / name).read_bytes()
             for name in ("adapter_config.json", "adapter_model.safetensors")}
    r = httpx.post(f"{live.url}/admin/tenants/initech/adapters/helper/versions", headers=admin,
                   files=files)
    assert r.status_code == 200 and r.json()["label"] == "v1", r.text
    bad = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"junk"}
    r = httpx.post(f"{live.url}/admin/tenants/initech/adapters/helper/versions", headers=admin,
                   files=bad)
    assert r.status_code == 400
    out = client(live, key=key).completions.create(model="helper", prompt="hi", max_tokens=2)
    assert out.usage.completion_tokens == 2
    r = httpx.get(f"{live.url}/admin/tenants/initech/adapters/helper/stats", headers=admin)
    assert r.json()["versions"][0]["requests"] >= 1
    actions = [e["action"] for e in httpx.get(f"{live.url}/admin/audit",
                                              headers=admin).json()["entries"]]
    assert "tenant.create" in actions and "key.create" in actions


def test_full_server_gets_503_with_retry_after(live):
    saved = live.settings.max_in_flight
    live.settings.max_in_flight = 0  # as if every slot of the server's queue were taken
    try:
        r = httpx.post(f"{live.url}/v1/completions",
                       headers={"Authorization": f"Bearer {live.keys['acme']}"},
                       json={"model": "support", "prompt": "hi", "max_tokens": 2})
    finally:
        live.settings.max_in_flight = saved
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "capacity" in r.json()["error"]["message"]

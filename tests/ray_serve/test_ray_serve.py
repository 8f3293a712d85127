"""Scale-out on Ray Serve through the official openai client: every tenant gets its own adapter,
multiplexed routing keeps an adapter on the replica that holds it, and losing a replica loses
no request that had not started streaming."""

import asyncio
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from loraplex import LLM, SamplingParams
from loraplex.home import HOME_ENV
from tests.ray_serve.conftest import BASE_NAME, ENGINE, TENANTS

# Ray's own pydantic models warn on import; ours would still show.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")

QUESTION = [{"role": "user", "content": "Hello there, who are you?"}]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def offline(ray_service):
    return LLM(str(ray_service.model_dir), **ENGINE)


def expected_text(offline, adapter_dir, max_tokens=MAX_TOKENS, ignore_eos=False) -> str:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos)
    return offline.generate(offline.tokenizer.encode_chat(QUESTION), params,
                            adapters=[adapter_dir])[0].text


async def ask(service, tenant, model="bot", stream=False) -> str:
    async with openai.AsyncOpenAI(base_url=f"{service.url}/v1", api_key=service.keys[tenant],
                                  max_retries=0, timeout=120) as client:
        kwargs = dict(model=model, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS)
        if not stream:
            r = await client.chat.completions.create(**kwargs)
            return r.choices[0].message.content
        text = ""
        async for chunk in await client.chat.completions.create(stream=True, **kwargs):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        return text


def engine_stats(service) -> dict:
    r = httpx.get(f"{service.url}/admin/engine", timeout=30,
                  headers={"Authorization": f"Bearer {service.admin_key}"})
    r.raise_for_status()
    return r.json()


def test_the_single_machine_server_does_not_import_ray():
    code = ("import sys, loraplex.server.app, loraplex.cli; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_serve_ray_says_what_is_wrong(tmp_path, sharp_llama_dir):
    def serve(*args, prelude=""):
        code = f"{prelude}from loraplex.cli import app; app({list(args)!r})"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, HOME_ENV: str(tmp_path)})
        assert done.returncode == 1 and "Traceback" not in done.stderr
        return " ".join(done.stderr.split())

    model = ["serve", "--model", str(sharp_llama_dir), "--ray"]
    # Without Ray installed (simulated: the import fails).
    assert "pip install 'loraplex[ray]'" in serve(
        *model, prelude="import sys; sys.modules['ray'] = None; ")
    assert "lower --cpus-per-replica" in serve(*model, "--cpus-per-replica", "4096")


@pytest.mark.parametrize("stream", [False, True])
def test_every_tenant_gets_its_own_adapter(ray_service, offline, stream):
    async def everyone():
        return await asyncio.gather(*(ask(ray_service, t, stream=stream) for t in TENANTS),
                                    ask(ray_service, "acme", BASE_NAME, stream=stream))

    got = asyncio.run(everyone())
    want = [expected_text(offline, ray_service.adapters[t]) for t in TENANTS]
    want.append(expected_text(offline, None))
    assert got == want
    assert len(set(want)) == len(want)  # the adapters really differ


def by_replica(service, key: str) -> dict[str, object]:
    return {r["replica_id"]: r[key] for r in engine_stats(service)["replicas"]}


def total_loads(loads_by_version: dict[str, dict[str, int]]) -> int:
    return sum(n for loads in loads_by_version.values() for n in loads.values())


def test_repeated_requests_go_to_the_replica_holding_the_adapter(ray_service):
    async def warm_up():  # one new tenant at a time
        for tenant in TENANTS:
            await ask(ray_service, tenant)
            await asyncio.sleep(0.3)  # replicas tell the routers what they hold every 0.1 s

    async def traffic(repeats):
        for _ in range(repeats):
            await asyncio.gather(*(ask(ray_service, t) for t in TENANTS))

    asyncio.run(warm_up())
    loads_before = by_replica(ray_service, "loads_by_version")
    requests_before = by_replica(ray_service, "requests")
    asyncio.run(traffic(5))
    loads_after = by_replica(ray_service, "loads_by_version")
    requests_after = by_replica(ray_service, "requests")

    assert len(loads_after) == 2
    new_loads = total_loads(loads_after) - total_loads(loads_before)
    assert new_loads <= 1, (loads_before, loads_after)  # for 30 requests
    assert total_loads(loads_after) <= 2 * len(TENANTS)  # over every test's requests so far
    # Both replicas served: the tenants are sharded, not all sent to one replica.
    assert all(requests_after[r] > requests_before[r] for r in requests_after)


def test_admin_routes_reach_every_replica(ray_service):
    headers = {"Authorization": f"Bearer {ray_service.admin_key}"}
    r = httpx.post(f"{ray_service.url}/admin/tenants/stark/adapters/bot/prewarm?pin=true",
                   headers=headers, timeout=60)
    assert r.status_code == 200 and r.json() == {"prewarmed": "bot v1", "pinned": True}
    pinned = [replica["pinned"] for replica in engine_stats(ray_service)["replicas"]]
    assert sorted(pinned) == [[], [ray_service.version_ids["stark"]]]  # on one replica

    metrics = httpx.get(f"{ray_service.url}/metrics", timeout=30).text
    assert "loraplex_engine_kv_blocks_total" in metrics
    stats = engine_stats(ray_service)
    assert stats["kv_blocks_total"] == sum(r["kv_blocks_total"] for r in stats["replicas"])


def test_a_client_that_goes_away_frees_the_replica(ray_service):
    max_tokens = 200
    body = {"model": "bot", "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    generated_before = engine_stats(ray_service)["generated_tokens"]
    with httpx.stream("POST", f"{ray_service.url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {ray_service.keys['globex']}"}) as r:
        next(r.iter_lines())  # the first chunk arrived: the request runs on a replica
    deadline = time.monotonic() + 30
    while any(r["running"] or r["waiting"] for r in engine_stats(ray_service)["replicas"]):
        assert time.monotonic() < deadline, "the request kept running after the client left"
        time.sleep(0.1)
    generated = engine_stats(ray_service)["generated_tokens"] - generated_before
    assert generated < max_tokens  # aborted on the replica, not run to the end


def test_losing_a_replica_loses_no_request_that_had_not_started_streaming(ray_service, offline):
    import ray

    max_tokens = 100
    extra = dict(max_tokens=max_tokens, extra_body={"ignore_eos": True})

    errors = []  # why the failed ones failed, for the assertion's message

    async def streamed(tenant) -> tuple[str | None, bool]:
        """(the text, or None if the request failed; whether any text had arrived)."""
        text = ""
        try:
            async with openai.AsyncOpenAI(base_url=f"{ray_service.url}/v1", max_retries=0,
                                          api_key=ray_service.keys[tenant], timeout=120) as c:
                async for chunk in await c.chat.completions.create(
                        model="bot", messages=QUESTION, temperature=0, stream=True, **extra):
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
            return text, True
        except openai.APIError as e:
            errors.append(f"{tenant} after {len(text)} chars: {e}")
            return None, bool(text)

    async def a_replica_with_queued_requests() -> dict:
        """One with requests that had not started: they must be sent to the other replica."""
        async with httpx.AsyncClient(headers={
                "Authorization": f"Bearer {ray_service.admin_key}"}) as http:
            for _ in range(400):
                r = await http.get(f"{ray_service.url}/admin/engine", timeout=30)
                for replica in r.json()["replicas"]:
                    if replica["running"] and replica["waiting"]:
                        return replica
                await asyncio.sleep(0.02)
        raise AssertionError("no replica ever had requests waiting")

    async def burst_with_a_kill():
        tasks = [asyncio.create_task(streamed(t)) for _ in range(3) for t in TENANTS]
        victim = await a_replica_with_queued_requests()
        ray.kill(ray.get_actor(victim["replica_id"], namespace="serve"), no_restart=True)
        return victim, await asyncio.gather(*tasks)

    victim, results = asyncio.run(burst_with_a_kill())
    want = {t: expected_text(offline, ray_service.adapters[t], max_tokens, True)
            for t in TENANTS}
    outcomes = list(zip([t for _ in range(3) for t in TENANTS], results, strict=True))
    failed = [started for _, (text, started) in outcomes if text is None]
    assert all(failed), errors  # only requests that had started streaming may fail
    assert len(failed) <= ENGINE["max_num_seqs"]  # at most the victim's running batch
    assert all(text == want[t] for t, (text, _) in outcomes if text is not None)

    # Serve replaces the replica; then everyone is served again, by two replicas.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        replicas = by_replica(ray_service, "requests")
        if len(replicas) == 2 and victim["replica_id"] not in replicas:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the lost replica was not replaced")

    async def everyone():
        return await asyncio.gather(*(ask(ray_service, t) for t in TENANTS))

    assert asyncio.run(everyone()) == [expected_text(offline, ray_service.adapters[t])
                                       for t in TENANTS]

"""AsyncEngine: streaming deltas, concurrency, aborts on disconnect, bad requests stay alone."""

import asyncio

import pytest

from loraplex.engine.async_engine import AsyncEngine
from loraplex.engine.llm_engine import RequestError
from loraplex.engine.sequence import AdapterRequest
from loraplex.sampling_params import SamplingParams
from tests.engine.test_llm_engine import make_engine, prompts, run

PARAMS = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture
def engine(sharp_llama_dir):
    engine = AsyncEngine(engine=make_engine(sharp_llama_dir))
    yield engine
    engine.shutdown()


async def collect(engine, prompt, params=PARAMS, adapter=None):
    deltas = [d async for d in engine.generate(prompt, params, adapter)]
    return deltas


async def wait_until_idle(engine, timeout=5.0):
    for _ in range(int(timeout / 0.01)):
        stats = await engine.stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        await asyncio.sleep(0.01)
    raise AssertionError("engine still busy")


def test_stream_deltas_add_up_to_the_offline_result(engine, sharp_llama_dir, sharp_adapters):
    reference = run(make_engine(sharp_llama_dir),
                    [(prompts(2)[1], AdapterRequest(3, str(sharp_adapters[3])))], PARAMS)

    async def main():
        return await collect(engine, prompts(2)[1], adapter=AdapterRequest(3,
                                                                           str(sharp_adapters[3])))

    deltas = asyncio.run(main())
    assert "".join(d.text for d in deltas) == reference[("r0", 0)].text
    assert [t for d in deltas for t in d.token_ids] == reference[("r0", 0)].token_ids
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"
    assert deltas[-1].completion_tokens == 20 and deltas[-1].prompt_tokens == len(prompts(2)[1])
    assert not any(d.finished for d in deltas[:-1])


def test_concurrent_requests_and_a_bad_one(engine, sharp_adapters):
    async def main():
        good = [asyncio.create_task(collect(engine, prompts(6)[i], adapter=AdapterRequest(
            i, str(sharp_adapters[i])))) for i in range(6)]
        with pytest.raises(RequestError, match="max_model_len"):
            await collect(engine, list(range(1, 120)) * 2)
        return await asyncio.gather(*good)

    results = asyncio.run(main())
    assert all(r[-1].finished and r[-1].completion_tokens == 20 for r in results)


def test_leaving_the_stream_aborts_and_frees_everything(engine):
    async def main():
        stream = engine.generate(prompts(1)[0], SamplingParams(temperature=0, max_tokens=100,
                                                               ignore_eos=True))
        async for _ in stream:
            break  # the client went away after the first delta
        await stream.aclose()
        return await wait_until_idle(engine)

    stats = asyncio.run(main())
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_cancelled_task_aborts(engine):
    async def main():
        started = asyncio.Event()

        async def consume():
            params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
            async for _ in engine.generate(prompts(1)[0], params):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()  # the request is running in the engine
        task.cancel()  # what the server does when a client disconnects
        with pytest.raises(asyncio.CancelledError):
            await task
        return await wait_until_idle(engine)

    stats = asyncio.run(main())
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert stats["generated_tokens"] < 200


def test_broken_adapter_fails_its_stream_with_a_message(engine, tmp_path):
    async def main():
        return await collect(engine, prompts(1)[0], adapter=AdapterRequest(77, str(tmp_path)))

    deltas = asyncio.run(main())
    assert deltas[-1].finish_reason == "error" and "adapter_config.json" in deltas[-1].error


def test_prewarm_during_a_request_fills_host_cache_and_slot(engine, sharp_adapters, tmp_path):
    adapter = AdapterRequest(5, str(sharp_adapters[5]))

    async def main():
        params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
        running = asyncio.create_task(collect(engine, prompts(1)[0], params))
        await engine.prewarm(adapter)
        with pytest.raises(ValueError, match="adapter_config.json"):
            await engine.prewarm(AdapterRequest(6, str(tmp_path)))
        await running
        await collect(engine, prompts(2)[1], adapter=adapter)
        return await engine.stats()

    stats = asyncio.run(main())
    assert 5 in stats["adapters_in_host_cache"] and 5 in stats["adapters_in_slots"]
    assert stats["host_misses"] == 2  # adapter 5 once (not again for its request), and the broken
    assert stats["slot_hits"] == 1  # its request found it already in a slot


def test_builds_the_engine_on_its_own_thread_and_raises_what_building_raises(sharp_llama_dir,
                                                                            tmp_path):
    from loraplex.config import EngineConfig
    from loraplex.model.loader import ModelLoadError

    with pytest.raises(ModelLoadError, match="no config.json"):
        AsyncEngine(EngineConfig(model=str(tmp_path)))
    engine = AsyncEngine(EngineConfig(model=str(sharp_llama_dir), kv_cache_bytes=1 << 22))
    try:
        assert engine.engine is not None and engine.tokenizer is engine.engine.tokenizer
        deltas = asyncio.run(collect(engine, prompts(1)[0]))
        assert deltas[-1].finished and deltas[-1].completion_tokens == PARAMS.max_tokens
    finally:
        engine.shutdown()

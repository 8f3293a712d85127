"""The loraplex systems do the real work: exactly max_tokens per request, the same greedy tokens
as LLM.generate, with the workload's concurrency and arrival times honoured."""

from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from loraplex import LLM
from loraplex.bench.adapters import write_random_adapter
from loraplex.bench.loraplex_systems import (
    BASELINE_NAME,
    INT8_NAME,
    RESIDENT_NAME,
    LoraplexEngineSystem,
    LoraplexHTTPSystem,
    greedy,
)
from loraplex.bench.workload import WorkloadSpec, make_workload
from loraplex.model.loader import read_config
from loraplex.server.protocol import CompletionRequest

VOCAB = range(3, 98)  # the tiny tokenizers' ordinary characters
MAX_MODEL_LEN = 64


def strong_adapters(model_dir: Path, root: Path, count: int) -> list[Path]:
    """Random rank-8 adapters whose B is scaled up, so they change greedy tokens."""
    config = read_config(model_dir)
    paths = []
    for i in range(count):
        path = write_random_adapter(root / f"a{i}", config, 8, seed=i)
        weights = load_file(path / "adapter_model.safetensors")
        save_file({k: v * 100 if "lora_B" in k else v for k, v in weights.items()},
                  path / "adapter_model.safetensors")
        paths.append(path)
    return paths


def spec(**fields) -> WorkloadSpec:
    return WorkloadSpec(**{"num_requests": 10, "num_adapters": 3, "concurrency": 3,
                           "prompt_len": (3, 20), "output_len": (2, 12), **fields})


def max_in_flight(records) -> int:
    """The most requests that had started and not yet finished at any request's start."""
    return max(sum(1 for o in records if o.start_s <= r.start_s < o.token_times_s[-1])
               for r in records)


@pytest.fixture(scope="module")
def adapters(sharp_llama_dir, tmp_path_factory) -> list[Path]:
    return strong_adapters(sharp_llama_dir, tmp_path_factory.mktemp("bench_adapters"), 3)


@pytest.fixture(scope="module")
def engine_system(sharp_llama_dir, adapters):
    system = LoraplexEngineSystem(max_batch_size=3, max_loras=2, max_model_len=MAX_MODEL_LEN)
    system.setup(sharp_llama_dir, adapters, dtype="float32")
    yield system
    system.close()


def test_engine_system_generates_llm_generate_tokens(engine_system, sharp_llama_dir, adapters):
    requests = make_workload(spec(popularity="uniform"), VOCAB)
    records = engine_system.run(requests)
    assert [r.index for r in records] == [q.index for q in requests]
    for record, request in zip(records, requests, strict=True):
        assert record.error is None
        assert record.output_tokens == request.max_tokens  # EOS ignored: exactly max_tokens
        assert record.adapter == request.adapter
        assert record.prompt_tokens == len(request.prompt_ids)
    llm = LLM(str(sharp_llama_dir), max_loras=3, max_lora_rank=8, max_model_len=MAX_MODEL_LEN,
              kv_cache_bytes=1 << 22)
    try:
        for request in requests:
            expected = llm.generate(list(request.prompt_ids), greedy(request.max_tokens),
                                    adapters=[adapters[request.adapter]])[0].token_ids
            assert engine_system.outputs[request.index] == expected
        # The adapters are applied: the base model answers differently.
        base = [llm.generate(list(r.prompt_ids), greedy(r.max_tokens))[0].token_ids
                for r in requests]
        assert base != [engine_system.outputs[r.index] for r in requests]
    finally:
        llm.engine.shutdown()
    stats = engine_system.stats()
    # 3 adapters in 2 slots: some requests must activate theirs.
    assert stats["slot_hits"] + stats["slot_misses"] >= len(requests)
    assert stats["slot_misses"] >= 1 and stats["peak_rss_bytes"] > 0


def test_closed_loop_keeps_concurrency_in_flight(engine_system):
    records = engine_system.run(make_workload(spec(num_requests=9), VOCAB))
    assert max_in_flight(records) == 3
    assert all(r.start_s >= 0 and r.token_times_s == sorted(r.token_times_s) for r in records)


def test_open_loop_starts_no_request_before_it_arrives(engine_system):
    requests = make_workload(spec(num_requests=6, arrival="poisson", rate=100.0), VOCAB)
    records = engine_system.run(requests)
    assert all(r.start_s >= r.arrival_s == q.arrival_s for r, q in zip(records, requests,
                                                                         strict=True))
    assert all(r.output_tokens == q.max_tokens for r, q in zip(records, requests, strict=True))


def test_a_request_the_engine_refuses_fails_alone(engine_system):
    requests = make_workload(spec(num_requests=4, prompt_len=(70, 70)), VOCAB)
    requests += [replace(r, index=4 + r.index) for r in make_workload(spec(num_requests=2),
                                                                      VOCAB)]
    records = engine_system.run(requests)
    assert sum(r.error is not None for r in records) == 4
    assert "max_model_len" in records[0].error
    assert sum(r.output_tokens for r in records) == sum(q.max_tokens for q in requests[4:])


def test_resident_system_gives_every_adapter_a_slot_and_the_same_tokens(
        engine_system, sharp_llama_dir, adapters):
    system = LoraplexEngineSystem(max_batch_size=3, max_loras=None, max_cpu_loras=1,
                                  max_model_len=MAX_MODEL_LEN)
    try:
        system.setup(sharp_llama_dir, adapters, dtype="float32")
        assert system.name == RESIDENT_NAME
        requests = make_workload(spec(popularity="zipf"), VOCAB)
        system.run(requests)
        stats = system.stats()
        # Pre-warmed into 3 slots: every request is a slot hit, nothing is read again.
        assert stats["slot_misses"] == stats["host_misses"] == 0
        assert stats["slot_hits"] == len(requests)
        engine_system.run(requests)
        assert system.outputs == engine_system.outputs
    finally:
        system.close()


def test_int8_system_serves_with_int8_slots(sharp_llama_dir, adapters):
    system = LoraplexEngineSystem(max_batch_size=3, max_model_len=MAX_MODEL_LEN,
                                  lora_dtype="int8")
    try:
        system.setup(sharp_llama_dir, adapters, dtype="float32")
        assert system.name == INT8_NAME and system.engine.adapters.slots.int8
        records = system.run(make_workload(spec(), VOCAB))
        assert all(r.error is None and r.output_tokens > 0 for r in records)
    finally:
        system.close()


def test_host_cache_smaller_than_the_adapters_reads_them_again(sharp_llama_dir, adapters):
    system = LoraplexEngineSystem(max_batch_size=3, max_loras=1, max_cpu_loras=1,
                                  max_model_len=MAX_MODEL_LEN)
    try:
        system.setup(sharp_llama_dir, adapters, dtype="float32")
        records = system.run(make_workload(spec(popularity="uniform"), VOCAB))
        assert all(r.error is None for r in records)
        assert system.stats()["host_misses"] >= 1
    finally:
        system.close()


def test_random_adapters_are_written_in_the_asked_dtype(sharp_llama_dir, tmp_path):
    import torch

    path = write_random_adapter(tmp_path / "a", read_config(sharp_llama_dir), 4,
                                dtype=torch.bfloat16)
    weights = load_file(path / "adapter_model.safetensors")
    assert weights and all(w.dtype == torch.bfloat16 for w in weights.values())


def test_base_system_runs_the_same_requests_without_adapters(sharp_llama_dir, adapters):
    system = LoraplexEngineSystem(max_batch_size=4, use_adapters=False,
                                  max_model_len=MAX_MODEL_LEN)
    try:
        system.setup(sharp_llama_dir, adapters, dtype="float32")
        assert system.name == BASELINE_NAME
        requests = make_workload(spec(num_requests=4), VOCAB)
        records = system.run(requests)
        assert [r.output_tokens for r in records] == [q.max_tokens for q in requests]
        assert system.stats()["slot_hits"] == system.stats()["slot_misses"] == 0
    finally:
        system.close()


def test_http_system_returns_the_same_token_counts(tiny_llama_dir, tmp_path):
    adapters = strong_adapters(tiny_llama_dir, tmp_path, 2)
    system = LoraplexHTTPSystem(max_batch_size=3, max_loras=2, max_model_len=MAX_MODEL_LEN)
    try:
        system.setup(tiny_llama_dir, adapters, dtype="float32")
        requests = make_workload(spec(num_requests=7, num_adapters=2), VOCAB)
        requests += [replace(r, index=7 + r.index) for r in make_workload(
            spec(num_requests=2, num_adapters=0, seed=1), VOCAB)]
        records = system.run(requests)
        assert [r.error for r in records] == [None] * len(requests)
        assert [r.output_tokens for r in records] == [q.max_tokens for q in requests]
        assert max_in_flight(records[:7]) <= 3
        stats = system.stats()
        assert stats["slot_hits"] + stats["slot_misses"] == 7  # the base requests use no slot
    finally:
        system.close()


def test_completions_honour_ignore_eos():
    body = CompletionRequest(model="m", prompt=[1, 2], max_tokens=3, ignore_eos=True)
    assert body.sampling_params(3, None).ignore_eos
    assert not CompletionRequest(model="m", prompt=[1]).sampling_params(3, None).ignore_eos

"""The peer systems of the benchmark, on tiny models (one torch thread: tests/bench/conftest.py):
one complete record per request, the same greedy tokens as an independent transformers + PEFT
loop, and llama.cpp equal to PEFT in f32."""

from __future__ import annotations

import copy

import pytest
import torch

from loraplex.bench.adapters import write_random_adapter
from loraplex.bench.peers import (
    LlamaCppSystem,
    PeftMixedSystem,
    PeftSwitchSystem,
    TransformersSystem,
)
from loraplex.bench.workload import BenchRequest
from loraplex.lora.modules import ATTENTION_MODULES
from loraplex.model.loader import read_config

# Adapters 0 and 1 on every module, adapter 2 on attention only; None is the base model. Prompts
# and answers of different lengths so that rows are padded and finish at different steps.
REQUESTS = [
    BenchRequest(0, 0.0, 0, (5, 9, 14, 3, 77, 41, 8), 6),
    BenchRequest(1, 0.0, 1, (20, 21, 22), 3),
    BenchRequest(2, 0.0, None, (100, 7, 7, 64, 12, 90, 33, 5, 61, 2), 5),
    BenchRequest(3, 0.01, 2, (44, 45), 8),
    BenchRequest(4, 0.02, 1, (5, 9, 14, 3, 77, 41, 8), 4),
]


@pytest.fixture(scope="module")
def adapters(bpe_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("peer_adapters")
    config = read_config(bpe_llama_dir)
    return [
        write_random_adapter(root / "a0", config, 8, seed=1),
        write_random_adapter(root / "a1", config, 4, seed=2),
        write_random_adapter(root / "a2", config, 8, targets=ATTENTION_MODULES, seed=3),
    ]


def greedy(model, prompt, max_tokens) -> list[int]:
    """Greedy tokens by recomputing the whole sequence each step: no cache, no padding."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(max_tokens):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def expected(bpe_llama_dir, adapters) -> dict[int, list[int]]:
    """Each request's tokens from its own model: the base alone, or a PeftModel with only the
    request's adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(bpe_llama_dir, dtype=torch.float32).eval()
    models = {None: base}
    for i, path in enumerate(adapters):
        models[i] = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    return {r.index: greedy(models[r.adapter], r.prompt_ids, r.max_tokens) for r in REQUESTS}


@pytest.fixture(scope="module")
def base_tokens(bpe_llama_dir) -> dict[int, list[int]]:
    """Each request's tokens from the base model, whatever adapter it names."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(bpe_llama_dir, dtype=torch.float32).eval()
    return {r.index: greedy(base, r.prompt_ids, r.max_tokens) for r in REQUESTS}


def run_system(system, model_dir, adapters, dtype="float32", requests=REQUESTS):
    system.setup(model_dir, adapters, dtype=dtype)
    try:
        records = system.run(requests)
        return records, dict(system.outputs), system.stats()
    finally:
        system.close()


def check_records(records, requests=REQUESTS):
    assert [r.index for r in records] == [r.index for r in requests]
    for record, request in zip(records, requests, strict=True):
        assert record.error is None
        assert record.adapter == request.adapter
        assert record.prompt_tokens == len(request.prompt_ids)
        assert record.arrival_s == request.arrival_s
        assert record.start_s >= request.arrival_s
        assert record.output_tokens == request.max_tokens
        times = record.token_times_s
        assert times[0] >= record.start_s
        assert times == sorted(times)


def test_the_adapters_change_the_answers(expected, base_tokens):
    """Otherwise the comparisons below could not tell an adapter from the base model."""
    changed = {r.index for r in REQUESTS if expected[r.index] != base_tokens[r.index]}
    assert {0, 3} <= changed
    assert 2 not in changed  # the base model's request


@pytest.mark.parametrize("max_batch_size", [32, 2])
def test_peft_mixed_batch_matches_peft(bpe_llama_dir, adapters, expected, max_batch_size):
    system = PeftMixedSystem(max_batch_size=max_batch_size)
    assert system.name == "PEFT mixed batch"
    records, outputs, stats = run_system(system, bpe_llama_dir, adapters)
    check_records(records)
    assert outputs == expected
    assert stats["adapters_loaded"] == 3
    assert stats["rows"] == len(REQUESTS)
    if max_batch_size == 2:
        assert stats["batches"] >= 3


def test_peft_set_adapter_matches_peft(bpe_llama_dir, adapters, expected):
    system = PeftSwitchSystem(max_batch_size=32)
    assert system.name == "PEFT set_adapter"
    records, outputs, stats = run_system(system, bpe_llama_dir, adapters)
    check_records(records)
    assert outputs == expected
    assert stats["batches"] == len(REQUESTS)
    # The warm-up left a0 active: then a1, base, a2, a1.
    assert stats["adapter_switches"] == 4
    assert stats["idle_row_steps"] == 0


def test_transformers_serves_everything_on_the_base_model(bpe_llama_dir, adapters,
                                                        base_tokens):
    closed = [BenchRequest(r.index, 0.0, r.adapter, r.prompt_ids, r.max_tokens) for r in REQUESTS]
    system = TransformersSystem(max_batch_size=32)
    assert system.name == "transformers, no adapters"
    records, outputs, stats = run_system(system, bpe_llama_dir, adapters, requests=closed)
    check_records(records, closed)
    assert outputs == base_tokens
    # One static batch of five, decoding until its longest row (8 tokens) is done.
    assert stats["batches"] == 1 and stats["forward_passes"] == 8
    assert stats["idle_row_steps"] == sum(8 - r.max_tokens for r in closed)
    assert stats["adapters_loaded"] == 0


def test_a_static_batch_waits_for_the_previous_one(bpe_llama_dir, adapters):
    late = [BenchRequest(0, 0.0, 0, (1, 2, 3), 4), BenchRequest(1, 0.05, 1, (4, 5), 3)]
    records, _, stats = run_system(PeftMixedSystem(), bpe_llama_dir, adapters, requests=late)
    check_records(records, late)
    assert stats["batches"] == 2  # the second request had not arrived when the first began
    assert records[1].start_s >= 0.05


def test_llama_cpp_matches_peft_in_f32(bpe_llama_dir, adapters, expected):
    system = LlamaCppSystem(max_batch_size=32, n_threads=1, f32_kv_cache=True)
    assert system.name == "llama.cpp"
    records, outputs, stats = run_system(system, bpe_llama_dir, adapters)
    check_records(records)
    assert outputs == expected
    assert stats["adapters_loaded"] == 3
    assert stats["adapter_switches"] == 4  # a0 (left by the warm-up), a1, none, a2, a1
    assert stats["requests"] == len(REQUESTS)
    assert stats["gguf_bytes"] > 0
    assert system.llm is None  # closed


def test_bfloat16_runs(bpe_llama_dir, adapters):
    """bf16 answers may differ from f32 ones; every system still serves every request."""
    for system in (PeftMixedSystem(), LlamaCppSystem(n_threads=1)):
        records, outputs, _ = run_system(system, bpe_llama_dir, adapters, dtype="bfloat16")
        check_records(records)
        assert [len(outputs[r.index]) for r in REQUESTS] == [r.max_tokens for r in REQUESTS]


def test_no_adapters_at_all(bpe_llama_dir, expected):
    """A run without adapters (num_adapters 0): PEFT systems serve the plain base model."""
    base_request = [r for r in REQUESTS if r.adapter is None]
    for system in (PeftMixedSystem(), PeftSwitchSystem(), LlamaCppSystem(n_threads=1,
                                                                          f32_kv_cache=True)):
        records, outputs, _ = run_system(system, bpe_llama_dir, [], requests=base_request)
        check_records(records, base_request)
        assert outputs == {2: expected[2]}


def test_unknown_dtype_is_refused(bpe_llama_dir):
    with pytest.raises(ValueError, match="dtype must be one of"):
        TransformersSystem().setup(bpe_llama_dir, [], dtype="int3")


def test_an_unknown_adapter_fails_alone(bpe_llama_dir, adapters, expected):
    requests = [REQUESTS[0], BenchRequest(9, 0.0, 7, (1, 2), 2)]
    for system in (PeftMixedSystem(), LlamaCppSystem(n_threads=1, f32_kv_cache=True)):
        records, outputs, _ = run_system(system, bpe_llama_dir, adapters, requests=requests)
        check_records(records[:1], requests[:1])
        assert "adapter 7 is not among the 3 set up" in records[1].error
        assert outputs == {0: expected[0]}

"""The engine: batching, preemption, chunked prefill and adapter slots never change a result."""

import pytest

from loraplex.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine, RequestError
from loraplex.engine.sequence import AdapterRequest
from loraplex.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, logprobs=2, ignore_eos=True)


def make_engine(model_dir, **overrides) -> LLMEngine:
    config = dict(model=str(model_dir), max_loras=4, max_cpu_loras=8, max_lora_rank=16,
                  max_model_len=128, block_size=4, kv_cache_bytes=1 << 22)
    return LLMEngine(EngineConfig(**{**config, **overrides}))


def prompts(n: int) -> list[list[int]]:
    """Deterministic prompts of varied lengths (3 to 40 tokens)."""
    return [[(7 * i + 13 * j) % 125 + 3 for j in range(3 + (11 * i) % 38)] for i in range(n)]


def run(engine: LLMEngine, requests: list[tuple[list[int], AdapterRequest | None]],
        params: SamplingParams = GREEDY, max_steps: int = 5000) -> dict:
    for i, (prompt, adapter) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, params, adapter)
    final = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.finished:
                final[(out.request_id, out.index)] = out
    assert not engine.has_unfinished(), "the engine did not finish in time"
    return final


def adapter(dirs, i) -> AdapterRequest:
    return AdapterRequest(i, str(dirs[i]))


@pytest.fixture(scope="module")
def alone(sharp_llama_dir, sharp_adapters):
    """Each (prompt, adapter) pair run alone: the reference every batched run must match."""
    engine = make_engine(sharp_llama_dir)
    results = {}
    for i, prompt in enumerate(prompts(12)):
        for a in (None, i):
            req = None if a is None else adapter(sharp_adapters, a)
            results[(i, a)] = run(engine, [(prompt, req)])[("r0", 0)]
    return results


def check_against_alone(final, alone, pairs):
    for i, (p, a) in enumerate(pairs):
        out = final[(f"r{i}", 0)]
        ref = alone[(p, a)]
        assert out.error is None
        assert out.token_ids == ref.token_ids, f"prompt {p} adapter {a}"
        assert max(abs(x - y) for x, y in zip(out.logprobs, ref.logprobs, strict=True)) < 1e-4


def _pairs(n):
    # Every prompt with its own adapter, and every third also with the base model.
    return [(i, i) for i in range(n)] + [(i, None) for i in range(0, n, 3)]


@pytest.mark.parametrize("setting", ["roomy", "chunked-prefill", "tiny-kv-cache"])
def test_batched_equals_alone_with_12_adapters_in_4_slots(
    setting, sharp_llama_dir, sharp_adapters, alone
):
    from loraplex.engine.model_runner import ModelRunner

    overrides = {}
    if setting == "chunked-prefill":
        overrides = dict(max_num_batched_tokens=8)  # prompts go in in chunks of <= 8 tokens
    if setting == "tiny-kv-cache":
        # Room for 40 blocks of 4 tokens: forces preemption and recomputation.
        probe = make_engine(sharp_llama_dir)
        overrides = dict(kv_cache_bytes=40 * ModelRunner.kv_bytes_per_block(probe.model,
                                                                            probe.config))
    engine = make_engine(sharp_llama_dir, **overrides)
    pairs = _pairs(12)
    final = run(engine, [(prompts(12)[p], None if a is None else adapter(sharp_adapters, a))
                         for p, a in pairs])
    check_against_alone(final, alone, pairs)
    stats = engine.stats()
    assert stats["slot_misses"] >= 12  # 12 adapters went through 4 slots
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    if setting == "tiny-kv-cache":
        assert stats["preemptions"] > 0


@pytest.mark.parametrize("kernels", ["lora", "attention", "none"])
def test_plain_pytorch_paths_equal_the_cpu_kernels(kernels, sharp_llama_dir, sharp_adapters,
                                                   alone):
    """`alone` ran with every CPU kernel this machine built; here the LoRA op, decode attention
    or both take their PyTorch paths (those of CUDA, and of a machine without a compiler)."""
    engine = make_engine(sharp_llama_dir)
    engine.runner.use_lora_kernel &= kernels == "lora"
    engine.runner.use_attention_kernel &= kernels == "attention"
    pairs = _pairs(6)
    final = run(engine, [(prompts(12)[p], None if a is None else adapter(sharp_adapters, a))
                         for p, a in pairs])
    check_against_alone(final, alone, pairs)


def test_int8_adapter_weights_stay_close_to_full_precision(sharp_llama_dir, sharp_adapters,
                                                          alone):
    """lora_dtype="int8" on the CPU kernel and on the plain PyTorch path (that of CUDA and of
    machines without a compiler): the two agree; against full-precision adapters (these tiny
    random ones change every output a lot, so their rounding shows more than a trained
    adapter's would) the greedy tokens agree for the first 10 and the log-probs stay within 0.1
    while they agree; requests without an adapter are untouched."""
    pairs = _pairs(12)
    requests = [(prompts(12)[p], None if a is None else adapter(sharp_adapters, a))
                for p, a in pairs]
    finals = []
    for kernel in (True, False):
        engine = make_engine(sharp_llama_dir, lora_dtype="int8")
        engine.runner.use_lora_kernel &= kernel
        finals.append(run(engine, requests))
    for i, (p, a) in enumerate(pairs):
        out, plain, ref = finals[0][(f"r{i}", 0)], finals[1][(f"r{i}", 0)], alone[(p, a)]
        assert out.error is None and out.token_ids == plain.token_ids
        assert max(abs(x - y) for x, y in zip(out.logprobs, plain.logprobs, strict=True)) < 1e-3
        same = next((j for j, (x, y) in enumerate(zip(out.token_ids, ref.token_ids, strict=True))
                     if x != y), len(ref.token_ids))
        assert same >= (len(ref.token_ids) if a is None else 10), f"prompt {p} adapter {a}"
        drift = max(abs(out.logprobs[j] - ref.logprobs[j]) for j in range(same))
        assert drift < (1e-4 if a is None else 0.1), f"prompt {p} adapter {a}"
    assert engine.stats()["slot_buffer_bytes"] < make_engine(
        sharp_llama_dir).stats()["slot_buffer_bytes"] / 3  # int8 of float32, plus the scales


def test_corrupt_adapter_fails_only_its_own_requests(sharp_llama_dir, sharp_adapters, alone,
                                                     tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    broken = AdapterRequest(99, str(tmp_path))
    engine = make_engine(sharp_llama_dir)
    requests = [(prompts(12)[0], adapter(sharp_adapters, 0)), (prompts(12)[1], broken),
                (prompts(12)[2], None), (prompts(12)[3], broken)]
    final = run(engine, requests)
    for rid in ("r1", "r3"):
        assert final[(rid, 0)].finish_reason == "error"
        assert str(tmp_path) in final[(rid, 0)].error
    check_against_alone({("r0", 0): final[("r0", 0)], ("r1", 0): final[("r2", 0)]}, alone,
                        [(0, 0), (2, None)])


def test_damaged_adapter_cache_entries_are_reloaded_while_others_are_served(
        sharp_llama_dir, sharp_adapters, alone, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_ADAPTER_CACHE", str(tmp_path / "cache"))
    run(make_engine(sharp_llama_dir), [(prompts(12)[i], adapter(sharp_adapters, i))
                                       for i in (4, 5)])
    entries = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(entries) == 2
    entries[0].write_bytes(b"\x00garbage")  # one torn entry, one truncated
    entries[1].write_bytes(entries[1].read_bytes()[:100])
    pairs = [(4, 4), (3, None), (5, 5)]
    final = run(make_engine(sharp_llama_dir),
                [(prompts(12)[p], None if a is None else adapter(sharp_adapters, a))
                 for p, a in pairs])
    check_against_alone(final, alone, pairs)
    assert all(e.stat().st_size > 100 for e in entries)  # rewritten whole


def test_prompt_longer_than_context_is_rejected(sharp_llama_dir):
    engine = make_engine(sharp_llama_dir, max_model_len=32)
    with pytest.raises(RequestError, match="40 tokens.*max_model_len.*32"):
        engine.add_request("long", list(range(40)), GREEDY)
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(RequestError, match=r"\[0, 128\)"):
        engine.add_request("bad", [5, 500], GREEDY)


def test_generation_stops_at_context_length(sharp_llama_dir):
    engine = make_engine(sharp_llama_dir, max_model_len=32)
    out = run(engine, [(list(range(1, 21)), None)],
              SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[("r0", 0)]
    assert out.finish_reason == "length" and len(out.token_ids) == 12


def test_abort_frees_blocks_and_slot_hold_within_one_step(sharp_llama_dir, sharp_adapters):
    engine = make_engine(sharp_llama_dir)
    engine.add_request("a", prompts(3)[2], GREEDY, adapter(sharp_adapters, 0))
    while not engine.scheduler.running:
        engine.step()
    engine.step()
    assert engine.blocks.num_free < engine.blocks.num_blocks
    outs = engine.abort("a")
    assert outs[0].finished and outs[0].finish_reason == "abort"
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert not engine.scheduler.running and not engine.has_unfinished()


def test_evicting_an_adapter_ends_its_requests_and_zeroes_its_slot(sharp_llama_dir,
                                                                   sharp_adapters, alone):
    engine = make_engine(sharp_llama_dir)
    engine.add_request("doomed", prompts(3)[2], GREEDY, adapter(sharp_adapters, 0))
    engine.add_request("kept", prompts(3)[1], GREEDY, adapter(sharp_adapters, 1))
    while len(engine.scheduler.running) < 2:
        engine.step()
    engine.step()
    first, count = engine.adapters.slots.pages.runs[engine.adapters.slot_of(0)]
    outs = engine.evict_adapters({0})
    assert [(o.request_id, o.finish_reason, o.error_kind) for o in outs] == [
        ("doomed", "error", "request")]
    assert engine.adapters.slot_of(0) is None and 0 not in engine.adapters.host
    assert all(not view.any() for view in engine.adapters.slots.page_views(first, count))
    # The other adapter's request goes on and still gives the tokens it gives alone.
    kept = None
    while engine.has_unfinished():
        kept = next((o for o in engine.step() if o.finished), kept)
    assert kept.request_id == "kept" and kept.token_ids == alone[(1, 1)].token_ids
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_pinned_adapter_stays_in_its_slot(sharp_llama_dir, sharp_adapters):
    engine = make_engine(sharp_llama_dir, max_loras=2, max_cpu_loras=2)
    pinned = adapter(sharp_adapters, 5)
    engine.prewarm(pinned, pin=True)
    assert engine.adapters.slot_of(5) is not None
    run(engine, [(prompts(12)[i], adapter(sharp_adapters, i)) for i in range(4)])
    assert engine.adapters.slot_of(5) is not None and 5 in engine.adapters.host
    with pytest.raises(ValueError, match="cannot pin more than 1"):
        engine.prewarm(adapter(sharp_adapters, 6), pin=True)
    engine.unpin(5)
    run(engine, [(prompts(12)[i], adapter(sharp_adapters, i)) for i in range(4)])
    assert engine.adapters.slot_of(5) is None


def test_prewarm_of_a_broken_adapter_is_a_clear_error(sharp_llama_dir, tmp_path):
    engine = make_engine(sharp_llama_dir)
    with pytest.raises(ValueError, match="adapter_config.json"):
        engine.prewarm(AdapterRequest(1, str(tmp_path)))


def test_adapters_in_slots_serve_without_a_host_copy(sharp_llama_dir, sharp_adapters, alone):
    # 4 slots, a host cache of 1: after pre-warming, every adapter lives in a slot only.
    engine = make_engine(sharp_llama_dir, max_loras=4, max_cpu_loras=1)
    for i in range(4):
        engine.prewarm(adapter(sharp_adapters, i))
    assert len(engine.adapters.host) == 1 and engine.stats()["host_misses"] == 4
    pairs = [(i, i) for i in range(4)]
    final = run(engine, [(prompts(12)[p], adapter(sharp_adapters, a)) for p, a in pairs])
    check_against_alone(final, alone, pairs)
    assert engine.stats()["host_misses"] == 4  # nothing read again
    # A fifth adapter takes a slot; the adapter it displaced is read again when asked for.
    final = run(engine, [(prompts(12)[4], adapter(sharp_adapters, 4))])
    displaced = next(i for i in range(4) if engine.adapters.slot_of(i) is None)
    final = run(engine, [(prompts(12)[displaced], adapter(sharp_adapters, displaced))])
    check_against_alone(final, alone, [(displaced, displaced)])
    assert engine.stats()["host_misses"] == 6


def test_tenants_fair_shares_never_change_a_result(sharp_llama_dir, sharp_adapters, alone):
    # Fair shares reorder admissions and preempt for fairness (4 seats, three tenants, one of
    # weight 3): each answer is still the one it gets alone.
    engine = make_engine(sharp_llama_dir, max_num_seqs=4, max_num_batched_tokens=32)
    for i, prompt in enumerate(prompts(12)):
        tenant = ("busy", "quiet", "gold")[min(i % 6, 2)]
        engine.add_request(f"r{i}", prompt, GREEDY, adapter(sharp_adapters, i), tenant,
                           3.0 if tenant == "gold" else 1.0)
    final, queued = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[int(out.request_id[1:])] = out
            if out.queue_seconds is not None:
                queued[out.request_id] = out.queue_seconds
    for i, out in final.items():
        assert out.token_ids == alone[(i, i)].token_ids
    assert len(queued) == 12 and all(q >= 0 for q in queued.values())
    assert engine.stats()["fairness"] == {}  # nobody has work left
    engine.shutdown()


@pytest.mark.parametrize("weight", [0, -1.0, float("inf"), float("nan"), True, "2"])
def test_a_bad_fairness_weight_is_refused(sharp_llama_dir, weight):
    engine = make_engine(sharp_llama_dir)
    with pytest.raises(RequestError, match="fairness_weight"):
        engine.add_request("r", [1, 2, 3], GREEDY, None, "t", weight)
    assert not engine.has_unfinished()
    engine.shutdown()

"""The prefix cache on a real engine: a hit gives the tokens a miss gives, blocks are never
found across tenants or adapter versions, the setting turns it off, hits are counted per tenant
and not charged to its fair share. (No block a running sequence holds is ever evicted: the
state machine in test_scheduler_properties.py.)"""

import pytest

from loraplex.config import ConfigError, EngineConfig
from loraplex.engine.llm_engine import LLMEngine, RequestOutput
from loraplex.engine.prefix_cache import block_hash
from loraplex.engine.sequence import AdapterRequest
from loraplex.sampling_params import SamplingParams

BLOCK = 4
GREEDY = SamplingParams(temperature=0, max_tokens=12, logprobs=1, ignore_eos=True)
PROMPT = [(11 * j) % 120 + 3 for j in range(30)]


def make_engine(model_dir, **overrides) -> LLMEngine:
    config = dict(model=str(model_dir), max_loras=2, max_cpu_loras=4, max_lora_rank=16,
                  max_model_len=128, block_size=BLOCK, kv_cache_bytes=1 << 22,
                  max_num_batched_tokens=16)
    return LLMEngine(EngineConfig(**{**config, **overrides}))


def generate(engine: LLMEngine, prompt: list[int], adapter: AdapterRequest | None = None,
             tenant: str = "", params: SamplingParams = GREEDY) -> RequestOutput:
    engine.add_request("r", prompt, params, adapter, fairness_key=tenant)
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            final = out if out.finished else final
    assert final is not None and final.error is None
    return final


def hits(engine: LLMEngine, tenant: str = "") -> int:
    return engine.stats()["prefix_cache"].get(tenant, {}).get("hit_tokens", 0)


def _same(out: RequestOutput, ref: RequestOutput) -> None:
    assert out.token_ids == ref.token_ids
    assert max(abs(x - y) for x, y in zip(out.logprobs, ref.logprobs, strict=True)) < 1e-4


@pytest.mark.parametrize("with_adapter", [False, True])
@pytest.mark.parametrize("length", [30, 29, 28])  # 29: one token left after the hit (a decode row)
def test_a_hit_gives_the_tokens_a_miss_gives(with_adapter, length, sharp_llama_dir,
                                             sharp_adapters):
    adapter = AdapterRequest(1, str(sharp_adapters[1])) if with_adapter else None
    prompt = PROMPT[:length]
    ref = generate(make_engine(sharp_llama_dir, enable_prefix_caching=False), prompt, adapter)
    engine = make_engine(sharp_llama_dir)
    _same(generate(engine, prompt, adapter), ref)
    assert hits(engine) == 0
    _same(generate(engine, prompt, adapter), ref)
    assert hits(engine) == (length - 1) // BLOCK * BLOCK  # all full blocks but the last token's


def test_a_chats_next_turn_finds_the_previous_answer(sharp_llama_dir):
    engine = make_engine(sharp_llama_dir)
    first = generate(engine, PROMPT)
    second_turn = PROMPT + first.token_ids + [5, 6, 7, 8, 9]
    out = generate(engine, second_turn)
    # The last answer token's KV was never computed: the cache holds the full blocks before it.
    assert hits(engine) == (len(PROMPT) + len(first.token_ids) - 1) // BLOCK * BLOCK
    ref = generate(make_engine(sharp_llama_dir, enable_prefix_caching=False), second_turn)
    _same(out, ref)


@pytest.mark.parametrize("scheduling", ["fair", "fcfs"])  # fcfs gives everyone one fairness key
def test_a_tenant_never_finds_another_tenants_blocks(scheduling, sharp_llama_dir,
                                                     sharp_adapters):
    adapter = AdapterRequest(1, str(sharp_adapters[1]))
    engine = make_engine(sharp_llama_dir, scheduling=scheduling)
    for which in (None, adapter):  # the base model too: timing must tell b nothing about a
        generate(engine, PROMPT, which, tenant="a")
        out = generate(engine, PROMPT, which, tenant="b")
        assert hits(engine, "b") == 0
        assert generate(engine, PROMPT, which, tenant="a").token_ids == out.token_ids
    assert hits(engine, "a") == 2 * 28
    assert hits(engine, "b") == 0


def test_a_new_adapter_version_never_finds_the_old_versions_blocks(sharp_llama_dir,
                                                                   sharp_adapters):
    # vLLM issue #42125: a new version served the old one's cached KV. Even with the same files
    # (the engine knows versions by id), version 2 computes its own.
    path = str(sharp_adapters[2])
    engine = make_engine(sharp_llama_dir)
    generate(engine, PROMPT, AdapterRequest(1, path))
    generate(engine, PROMPT, AdapterRequest(2, path))
    generate(engine, PROMPT)  # nor the base model an adapter's
    assert hits(engine) == 0
    generate(engine, PROMPT, AdapterRequest(2, path))
    assert hits(engine) == 28


def test_the_namespace_and_every_token_change_the_hash():
    parent, tokens = bytes(16), [1, 2, 3, 4]
    first = block_hash(parent, b"tenant a", tokens)
    assert block_hash(parent, b"tenant b", tokens) != first
    assert block_hash(parent, b"tenant a", [1, 2, 3, 5]) != first
    assert block_hash(first, b"tenant a", tokens) != first  # another position: another hash


def test_disabled_the_cache_finds_nothing(sharp_llama_dir):
    engine = make_engine(sharp_llama_dir, enable_prefix_caching=False)
    for _ in range(2):
        generate(engine, PROMPT)
    stats = engine.stats()
    assert stats["prefix_cache"] == {} and stats["prefix_cache_blocks"] == 0
    assert stats["prefix_cache_hit_tokens"] == 0
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.blocks.evictable


def test_hits_are_counted_per_tenant(sharp_llama_dir):
    engine = make_engine(sharp_llama_dir)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for tenant in ("a", "a", "b", "a"):
        generate(engine, PROMPT, tenant=tenant, params=params)
    stats = engine.stats()
    assert stats["prefix_cache"] == {
        "a": {"queried_tokens": 3 * 30, "hit_tokens": 2 * 28, "hit_rate": 56 / 90},
        "b": {"queried_tokens": 30, "hit_tokens": 0, "hit_rate": 0.0},
    }
    assert stats["prefix_cache_queried_tokens"] == 120 and stats["prefix_cache_hit_tokens"] == 56
    # 30 prompt + 2 computed output tokens: 8 full blocks for each tenant.
    assert stats["prefix_cache_blocks"] == 16
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]  # cached blocks count as free


def test_a_hit_is_not_charged_to_the_tenants_fair_share(sharp_llama_dir):
    engine = make_engine(sharp_llama_dir)
    config, vtc = engine.config, engine.scheduler.vtc
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    generate(engine, PROMPT, tenant="a", params=params)
    after_first = vtc.counter("a")
    assert after_first == 30 * config.fairness_input_cost + 3 * config.fairness_output_cost
    generate(engine, PROMPT, tenant="a", params=params)
    assert vtc.counter("a") - after_first == (30 - 28) * config.fairness_input_cost \
        + 3 * config.fairness_output_cost


def test_siblings_of_one_request_finish_with_every_block_released(sharp_llama_dir):
    engine = make_engine(sharp_llama_dir)
    params = SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=6, ignore_eos=True)
    generate(engine, PROMPT, params=params)
    # 16 tokens a step: the first sibling's prompt goes in chunks, and the next ones, admitted
    # later, find the blocks it has computed by then.
    shared = hits(engine)
    assert shared > 0
    generate(engine, PROMPT, params=params)  # all three find the prompt's blocks
    assert hits(engine) - shared == 3 * 28
    assert engine.blocks.ref_counts == [0] * engine.blocks.num_blocks


def test_the_setting_must_be_a_bool():
    with pytest.raises(ConfigError, match="enable_prefix_caching"):
        EngineConfig(model="unused", device="cpu", enable_prefix_caching="no")

"""Property tests of the scheduler, block manager and adapter manager, on a real LLMEngine.

After any sequence of add / step / abort / prewarm / pin / unpin: no KV block is leaked, a
block is shared only through the prefix cache and only by sequences of one tenant and adapter
version with the same tokens up to it, the prefix cache's eviction never hands out a block a
running sequence holds, no adapter a running sequence uses is evicted or overwritten, and every
request ends finished ("stop", "length", "abort" or "error"). The engine is made small on purpose
(2 slots, 3 host-cached adapters for 5 on disk, 14 KV blocks of 4 tokens, 16 tokens a step) so
that preemption, chunked prefill, slot draining, host-cache and prefix-cache eviction all happen
within a few steps; half the prompts begin alike, so that the prefix cache finds blocks.
"""

import functools
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from loraplex.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine, RequestError, RequestOutput
from loraplex.engine.sequence import AdapterRequest, SequenceStatus
from loraplex.lora.adapter import load_adapter
from loraplex.lora.modules import FUSED_LINEARS
from loraplex.lora.pages import pages_for
from loraplex.sampling_params import SamplingParams
from tests.conftest import make_peft_adapter, save_tiny_tokenizer, tiny_llama, tiny_llama_config

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ADAPTERS = [  # (rank, alpha, targets)
    (4, 8, ATTN),
    (8, 16, ATTN + MLP),
    (16, 16, ["q_proj", "v_proj"]),
    (8, 32, MLP),
    (16, 8, ["o_proj", "down_proj"]),
]
CORRUPT_ID = 99

MAX_LORAS = 2
# The state machine's engine: three slots but pages (of 8 rank rows) for three rank-8 adapters
# only, so a rank-16 adapter may have to empty two slots (memory by rank, lora/pages.py), and
# the slots' runs fragment and compact.
MACHINE_LORAS, MACHINE_PAGES, PAGE_RANK = 3, 3, 8
BLOCK_SIZE = 4
NUM_BLOCKS = 14
MAX_MODEL_LEN = 48  # a 40-token prompt can run into it: "length" by context, not max_tokens
MAX_DRAIN_STEPS = 2000
FINISH_REASONS = {"stop", "length", "abort", "error"}


def _kv_bytes_per_block() -> int:
    c = tiny_llama_config()
    head_dim = c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * BLOCK_SIZE * c.num_key_value_heads * head_dim * 4  # fp32


@functools.cache
def _assets() -> tuple[Path, list[AdapterRequest], AdapterRequest]:
    """The tiny model and its adapters, built once per process (a state machine can't take
    fixtures) and lazily, so that collecting this file stays cheap."""
    root = Path(tempfile.mkdtemp(prefix="loraplex-props-"))
    model_dir = root / "model"
    base = tiny_llama()
    base.save_pretrained(model_dir, safe_serialization=True)
    save_tiny_tokenizer(model_dir, tiny_llama_config().vocab_size)
    adapters = []
    for i, (r, alpha, targets) in enumerate(ADAPTERS):
        make_peft_adapter(base, root / f"a{i}", r, alpha, targets, seed=i + 1)
        adapters.append(AdapterRequest(i + 1, str(root / f"a{i}")))
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text("{not json")
    return model_dir, adapters, AdapterRequest(CORRUPT_ID, str(corrupt))


def _config(model_dir: Path, max_loras: int = MAX_LORAS,
            max_lora_pages: int | None = None) -> EngineConfig:
    return EngineConfig(
        model=str(model_dir), device="cpu", max_loras=max_loras, max_cpu_loras=3,
        max_num_seqs=4, max_num_batched_tokens=16, block_size=BLOCK_SIZE,
        max_model_len=MAX_MODEL_LEN, max_lora_rank=16, max_lora_pages=max_lora_pages,
        lora_page_rank=PAGE_RANK, kv_cache_bytes=NUM_BLOCKS * _kv_bytes_per_block(),
    )


_fingerprints: dict[int, tuple[tuple[int, str], torch.Tensor]] = {}


def _fingerprint(engine: LLMEngine, adapter: AdapterRequest) -> tuple[tuple, torch.Tensor]:
    """One (layer, module) key and its lora_A, to check a slot really holds this adapter."""
    if adapter.adapter_id not in _fingerprints:
        mc = engine.model.config
        weights = dict(load_adapter(adapter.path, num_layers=mc.num_layers,
                                    module_shapes=mc.module_shapes(), max_rank=16).pairs())
        key = min(weights)
        _fingerprints[adapter.adapter_id] = key, weights[key][0]
    return _fingerprints[adapter.adapter_id]


# What each prefix-cache hash has stood for, in any engine of this file: (tenant, adapter version,
# the tokens from position 0 to the block's end). One hash must always mean one such content.
_hash_contents: dict[bytes, tuple] = {}


def check_blocks(engine: LLMEngine) -> None:
    """Every KV block is free, cached and free, or held by the running sequences its reference
    count says; a block two sequences hold is a cached one, at the same place in both, of the
    same tenant and adapter version, with the same tokens up to its end, computed for both."""
    blocks, size = engine.blocks, engine.blocks.block_size
    holders = defaultdict(list)  # block -> [(sequence, index in its block table)]
    for seq in engine.scheduler.running:
        assert len(set(seq.block_table)) == len(seq.block_table), "a block twice in one table"
        for i, block in enumerate(seq.block_table):
            holders[block].append((seq, i))
    everything = blocks.free_blocks + list(blocks.evictable) + list(holders)
    assert len(everything) == len(set(everything)), "a block handed out while still held"
    assert sorted(everything) == list(range(blocks.num_blocks)), "a block leaked"
    assert blocks.ref_counts == [len(holders.get(b, ())) for b in range(blocks.num_blocks)]
    assert blocks.cached == {h: b for b, h in blocks.block_hash.items()}
    assert set(blocks.evictable) <= set(blocks.block_hash), "an evictable block is not cached"
    assert not set(blocks.free_blocks) & set(blocks.block_hash), "a free block is findable"
    for block, held in holders.items():
        (first, i), end = held[0], (held[0][1] + 1) * size
        content = (first.cache_key, first.adapter_id, first.token_ids[:end])
        if block in blocks.block_hash:
            assert first.num_computed_tokens >= end, "a block cached before it was computed"
            known = _hash_contents.setdefault(blocks.block_hash[block], content)
            assert known == content, "one hash, two contents"
        else:
            assert len(held) == 1, "a block shared outside the prefix cache"
        for seq, j in held[1:]:
            assert j == i and seq.num_computed_tokens >= end
            assert (seq.cache_key, seq.adapter_id, seq.token_ids[:end]) == content


def check_engine(engine: LLMEngine) -> None:
    """The blocks are consistent (check_blocks); every running sequence's adapter is still in
    its slot, really (its weights), not just on paper."""
    blocks, scheduler, adapters = engine.blocks, engine.scheduler, engine.adapters
    check_blocks(engine)
    assert len(scheduler.running) <= engine.config.max_num_seqs
    for seq in scheduler.running:
        assert seq.status is SequenceStatus.RUNNING
        assert seq.num_computed_tokens <= len(seq.block_table) * blocks.block_size
    for seq in scheduler.waiting:
        assert seq.status is SequenceStatus.WAITING
        assert seq.block_table == [] and seq.num_computed_tokens == 0 and seq.slot == -1
        assert seq.num_cached_blocks == 0

    in_slots = [a for a in adapters.slot_adapter if a is not None]
    assert len(in_slots) == len(set(in_slots)), f"an adapter is in two slots: {in_slots}"
    with_adapter = [s for s in scheduler.running if s.adapter is not None]
    assert len({s.adapter_id for s in with_adapter}) <= len(adapters.slot_adapter)
    for seq in scheduler.running:
        if seq.adapter is None:
            assert seq.slot == -1
            continue
        assert adapters.slot_adapter[seq.slot] == seq.adapter_id, "an in-use adapter was evicted"
        (layer, name), lora_a = _fingerprint(engine, seq.adapter)
        path, index = adapters.slots.place[name]
        row, rank = adapters.slots.places[seq.slot]
        start = len(FUSED_LINEARS[path]) * row + index * rank  # the module's A rows
        in_slot = adapters.slots.a[path][layer, start:start + lora_a.shape[0]]
        assert torch.equal(in_slot, lora_a), "an in-use slot was overwritten"
    # The slots' pages: no page held twice, free + used = all (lora/pages.py's invariant).
    runs = sorted(adapters.slots.pages.runs.values())
    assert all(a + n <= b for (a, n), (b, _) in zip(runs, runs[1:], strict=False))
    assert adapters.slots.pages.num_free + sum(n for _, n in runs) == adapters.slots.pages.num_pages


# Draw the length first: st.lists alone favours short lists, and long prompts are what fill the
# KV cache (preemption) and take several steps to prefill (chunking).
def _token_lists(min_len: int, max_len: int):
    return st.integers(min_len, max_len).flatmap(
        lambda n: st.lists(st.integers(0, 127), min_size=n, max_size=n))


# Two shared beginnings (a system prompt, a chat's earlier turns) cut anywhere, then a tail:
# prompts that the prefix cache finds in part, across requests, tenants and adapters.
PREFIXES = [[(5 * i + 7 * k) % 128 for i in range(24)] for k in range(2)]
prompts = st.one_of(
    _token_lists(1, MAX_MODEL_LEN + 2),
    st.tuples(st.sampled_from(PREFIXES), st.integers(1, 24), _token_lists(0, 20)).map(
        lambda t: t[0][:t[1]] + t[2]),
)
sampling_params = st.builds(
    SamplingParams,
    n=st.integers(1, 2),
    temperature=st.sampled_from([0.0, 0.8]),
    seed=st.integers(0, 2**16),  # with temperature > 0, a seed keeps the run reproducible
    max_tokens=st.integers(1, 12),
    ignore_eos=st.booleans(),
)
# (prompt, params, adapter index, tenant, its weight): -1 is the base model, -2 the corrupt
# adapter. Three tenants, so that fair shares reorder admissions and preempt for fairness.
requests = st.tuples(prompts, sampling_params, st.integers(-2, len(ADAPTERS) - 1),
                     st.sampled_from(["", "t1", "t2"]), st.sampled_from([1.0, 3.0]))


class EngineMachine(RuleBasedStateMachine):
    request_ids = Bundle("request_ids")

    @initialize()
    def start(self):
        self.model_dir, self.adapters, self.corrupt = _assets()
        self.engine = LLMEngine(_config(self.model_dir, MACHINE_LORAS, MACHINE_PAGES))
        assert self.engine.blocks.num_blocks == NUM_BLOCKS
        self.added: dict[str, tuple[int, AdapterRequest | None]] = {}  # id -> (n, adapter)
        self.final: dict[tuple[str, int], RequestOutput] = {}  # (id, index) -> finished output
        self.pinned: set[int] = set()
        self.pinned_in_slot: set[int] = set()
        self.next_id = 0

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        try:
            self._drain_and_check()
        finally:
            self.engine.shutdown()

    # -- rules ----------------------------------------------------------------------------------
    # Requests come in bursts of up to 3, so that several compete for blocks and slots at once.
    @rule(target=request_ids, burst=st.lists(requests, min_size=1, max_size=3))
    def add(self, burst):
        accepted = []
        for prompt, params, which, tenant, weight in burst:
            adapter = None if which == -1 else self.corrupt if which == -2 else self.adapters[which]
            request_id = f"r{self.next_id}"
            self.next_id += 1
            if len(prompt) >= MAX_MODEL_LEN:
                with pytest.raises(RequestError, match="max_model_len"):
                    self.engine.add_request(request_id, prompt, params, adapter)
                continue  # rejected up front: never known to the engine
            self.engine.add_request(request_id, prompt, params, adapter, tenant, weight)
            self.added[request_id] = (params.n, adapter)
            accepted.append(request_id)
        return multiple(*accepted)

    @rule(request_id=request_ids)
    def add_duplicate_id(self, request_id):
        if request_id not in self.engine.requests:
            return  # finished ids are forgotten and may be reused; only live ones must clash
        with pytest.raises(RequestError, match="already in use"):
            self.engine.add_request(request_id, [1, 2, 3], SamplingParams())

    @rule(num_steps=st.integers(1, 4))
    def step(self, num_steps):
        for _ in range(num_steps):
            self._record(self.engine.step())

    @rule(request_id=request_ids)
    def abort(self, request_id):
        outputs = self.engine.abort(request_id)
        self._record(outputs)
        for index in range(self.added[request_id][0]):
            # Whatever it was doing, it is finished now (aborted, or earlier for another reason).
            assert (request_id, index) in self.final

    @rule(which=st.integers(-1, len(ADAPTERS) - 1), pin=st.booleans())
    def prewarm(self, which, pin):
        adapter = self.corrupt if which == -1 else self.adapters[which]
        if adapter is self.corrupt:
            with pytest.raises(ValueError, match=re.escape(adapter.path)):
                self.engine.prewarm(adapter, pin=pin)
            return
        pinned = self.pinned | {adapter.adapter_id}
        if pin and len(pinned) >= MACHINE_LORAS:
            with pytest.raises(ValueError, match="cannot pin more than"):
                self.engine.prewarm(adapter, pin=pin)
            return
        # Pinned adapters must leave the pages of a max_lora_rank adapter free.
        pinned_pages = sum(pages_for(ADAPTERS[i - 1][0], PAGE_RANK) for i in pinned)
        if pin and pinned_pages + pages_for(16, PAGE_RANK) > MACHINE_PAGES:
            with pytest.raises(ValueError, match="cannot pin adapter"):
                self.engine.prewarm(adapter, pin=pin)
            return
        self.engine.prewarm(adapter, pin=pin)
        if pin:
            self.pinned.add(adapter.adapter_id)
        assert adapter.adapter_id in self.engine.adapters.host

    @precondition(lambda self: self.pinned)
    @rule(data=st.data())
    def unpin(self, data):
        adapter_id = data.draw(st.sampled_from(sorted(self.pinned)))
        self.engine.unpin(adapter_id)
        self.pinned.discard(adapter_id)
        self.pinned_in_slot.discard(adapter_id)

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def engine_is_consistent(self):
        if not hasattr(self, "engine"):
            return  # before start()
        check_engine(self.engine)
        adapters = self.engine.adapters
        assert adapters.pinned == self.pinned
        assert self.pinned <= set(adapters.host.ids()), "a pinned adapter left the host cache"
        for adapter_id in self.pinned_in_slot:
            assert adapter_id in adapters.slot_adapter, f"pinned adapter {adapter_id} lost its slot"
        self.pinned_in_slot = self.pinned & set(adapters.slot_adapter)

    # -- helpers --------------------------------------------------------------------------------
    def _record(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            key = (out.request_id, out.index)
            assert out.request_id in self.added
            done = self.final.get(key)
            if done is not None:
                # Reported again (abort returns every completion of a request): still the same end.
                assert out.finished and out.finish_reason == done.finish_reason
            elif out.finished:
                assert out.finish_reason in FINISH_REASONS, out.finish_reason
                self.final[key] = out
            else:
                assert out.finish_reason is None

    def _drain_and_check(self) -> None:
        for _ in range(MAX_DRAIN_STEPS):
            if not self.engine.has_unfinished():
                break
            self._record(self.engine.step())
            self.engine_is_consistent()
        else:
            pytest.fail(f"still unfinished after {MAX_DRAIN_STEPS} steps: {self.engine.stats()}")
        assert self.engine.blocks.num_free == NUM_BLOCKS
        assert self.engine.blocks.ref_counts == [0] * NUM_BLOCKS, "a reference leaked"
        assert self.engine.requests == {}
        assert self.engine.scheduler.fairness() == {}, "a finished sequence still counts"
        for request_id, (n, adapter) in self.added.items():
            for index in range(n):
                out = self.final.get((request_id, index))
                assert out is not None, f"{request_id}[{index}] never got a final output"
                if adapter is self.corrupt:
                    assert out.finish_reason in ("error", "abort")
                    if out.finish_reason == "error":
                        assert adapter.path in out.error
                else:
                    assert out.finish_reason != "error", out.error


TestEngineProperties = EngineMachine.TestCase
TestEngineProperties.settings = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- fixed scenarios ------------------------------------------------------------------------------
def _drain(engine: LLMEngine) -> dict[str, RequestOutput]:
    """Step until done, checking the engine after every step; the last output of each request."""
    last = {}
    for _ in range(MAX_DRAIN_STEPS):
        if not engine.has_unfinished():
            return last
        for out in engine.step():
            last[out.request_id] = out
        check_engine(engine)
    pytest.fail(f"still unfinished after {MAX_DRAIN_STEPS} steps: {engine.stats()}")


def test_the_test_config_preempts_drains_slots_and_evicts_from_the_host_cache():
    # The state machine only finds bugs on the paths it reaches: make sure this config forces them.
    model_dir, adapters, _ = _assets()
    engine = LLMEngine(_config(model_dir))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for adapter in adapters:  # short prompts: two run at once, so the others wait for a slot
        engine.add_request(f"adapter {adapter.adapter_id}", [5, 6, 7, 8], params, adapter)
    engine.add_request("base", [3] * 36, params)  # 12 of the 14 blocks by its end
    drained = False
    for _ in range(MAX_DRAIN_STEPS):
        if not engine.has_unfinished():
            break
        engine.step()
        check_engine(engine)
        drained |= bool(engine.adapters.reserved)
    stats = engine.stats()
    engine.shutdown()
    assert not engine.has_unfinished() and stats["kv_blocks_free"] == NUM_BLOCKS
    assert stats["preemptions"] > 0
    assert drained, "no slot was ever reserved to drain"
    assert stats["slot_misses"] >= len(adapters) > MAX_LORAS
    assert stats["host_misses"] >= len(adapters) > len(stats["adapters_in_host_cache"])


def test_pinning_an_adapter_cancels_a_drain_of_its_slot():
    # Regression: a slot reserved to drain for adapter c was handed to c even after its occupant
    # was pinned, evicting a pinned adapter from the device.
    model_dir, (a, b, c, *_), _ = _assets()
    engine = LLMEngine(_config(model_dir))
    for adapter in (a, b, c):
        engine.prewarm(adapter)
    short = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request("a", [5, 6, 7], short, a)
    engine.add_request("b", [5, 6, 7], SamplingParams(temperature=0, max_tokens=20), b)
    engine.step()
    engine.add_request("c", [5, 6, 7], short, c)
    engine.step()  # both slots are busy: c reserves one to drain
    [(slot, waiting_for)] = engine.adapters.reserved.items()
    assert waiting_for == c.adapter_id
    occupant = next(x for x in (a, b) if x.adapter_id == engine.adapters.slot_adapter[slot])
    engine.prewarm(occupant, pin=True)
    outputs = _drain(engine)
    engine.shutdown()
    assert occupant.adapter_id in engine.adapters.slot_adapter
    assert {k: o.finish_reason for k, o in outputs.items()} == {"a": "length", "b": "length",
                                                                  "c": "length"}


def test_the_test_config_shares_cached_blocks_and_evicts_them_under_pressure():
    # As above, for the prefix cache: blocks held by two sequences at once, hits on blocks no
    # one held, and cached blocks evicted for room, all within the config the machine uses.
    model_dir, _, _ = _assets()
    engine = LLMEngine(_config(model_dir))
    blocks, params = engine.blocks, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    shared = evicted = False
    for round_ in range(3):
        for i, prefix in enumerate(PREFIXES):
            engine.add_request(f"{round_}-{i}", prefix + [round_, i], params)
            engine.add_request(f"{round_}-{i}-again", prefix[:20], params)
        for _ in range(MAX_DRAIN_STEPS):
            if not engine.has_unfinished():
                break
            before = set(blocks.block_hash)
            engine.step()
            check_engine(engine)
            shared |= max(blocks.ref_counts) > 1
            evicted |= bool(before - set(blocks.block_hash))
    stats = engine.stats()
    engine.shutdown()
    assert shared, "no block was ever held by two sequences"
    assert evicted, "no cached block was ever evicted"
    assert stats["prefix_cache_hit_tokens"] > 0 and stats["kv_blocks_free"] == NUM_BLOCKS


def test_a_step_that_only_prefills_samples_nothing():
    # A prompt longer than max_num_batched_tokens (16) is prefilled over several steps; the
    # steps before the last have no token to sample.
    model_dir, _, _ = _assets()
    engine = LLMEngine(_config(model_dir))
    engine.add_request("r", list(range(3, 23)), SamplingParams(temperature=0, max_tokens=2))
    assert engine.step() == []
    outputs = _drain(engine)
    engine.shutdown()
    assert outputs["r"].finish_reason in ("stop", "length")


def test_corrupt_adapter_is_invalid_json():
    # Guards the state machine's premise: this directory fails to load, with its path named.
    _, _, corrupt = _assets()
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(corrupt.path, num_layers=2, module_shapes={}, max_rank=16)

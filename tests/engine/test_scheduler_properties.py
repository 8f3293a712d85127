"""Property tests of the scheduler, block manager and adapter manager, on a real LLMEngine.

After any sequence of add / step / abort / prewarm / pin / unpin: no KV block is leaked or owned
twice, no adapter a running sequence uses is evicted or overwritten, and every request ends
finished ("stop", "length", "abort" or "error"). The engine is made small on purpose (2 slots,
3 host-cached adapters for 5 on disk, 20 KV blocks of 4 tokens, 16 tokens a step) so that
preemption, chunked prefill, slot draining and host-cache eviction all happen within a few steps.
"""

import functools
import tempfile
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
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.llm_engine import LLMEngine, RequestError, RequestOutput
from loraplex.engine.sequence import AdapterRequest, Sequence, SequenceStatus
from loraplex.lora.adapter import load_adapter
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
BLOCK_SIZE = 4
NUM_BLOCKS = 20
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


def _config(model_dir: Path) -> EngineConfig:
    return EngineConfig(
        model=str(model_dir), device="cpu", max_loras=MAX_LORAS, max_cpu_loras=3,
        max_num_seqs=4, max_num_batched_tokens=16, block_size=BLOCK_SIZE,
        max_model_len=MAX_MODEL_LEN, max_lora_rank=16,
        kv_cache_bytes=NUM_BLOCKS * _kv_bytes_per_block(),
    )


_fingerprints: dict[int, tuple[tuple[int, str], torch.Tensor]] = {}


def _fingerprint(engine: LLMEngine, adapter: AdapterRequest) -> tuple[tuple, torch.Tensor]:
    """One (layer, module) key and its lora_A, to check a slot really holds this adapter."""
    if adapter.adapter_id not in _fingerprints:
        mc = engine.model.config
        weights = load_adapter(adapter.path, num_layers=mc.num_layers,
                               module_shapes=mc.module_shapes(), max_rank=16).weights
        key = min(weights)
        _fingerprints[adapter.adapter_id] = key, weights[key][0]
    return _fingerprints[adapter.adapter_id]


# Draw the length first: st.lists alone favours short lists, and long prompts are what fill the
# KV cache (preemption) and take several steps to prefill (chunking).
prompts = st.integers(1, MAX_MODEL_LEN + 2).flatmap(
    lambda n: st.lists(st.integers(0, 127), min_size=n, max_size=n)
)
sampling_params = st.builds(
    SamplingParams,
    n=st.integers(1, 2),
    temperature=st.sampled_from([0.0, 0.8]),
    seed=st.integers(0, 2**16),  # with temperature > 0, a seed keeps the run reproducible
    max_tokens=st.integers(1, 12),
    ignore_eos=st.booleans(),
)


class EngineMachine(RuleBasedStateMachine):
    request_ids = Bundle("request_ids")

    @initialize()
    def start(self):
        self.model_dir, self.adapter_list, self.corrupt = _assets()
        self.engine = LLMEngine(_config(self.model_dir))
        assert self.engine.blocks.num_blocks == NUM_BLOCKS
        self.added: dict[str, tuple[int, AdapterRequest | None]] = {}  # id -> (n, adapter)
        self.final: dict[tuple[str, int], RequestOutput] = {}  # (id, index) -> finished output
        self.pinned: set[int] = set()
        self.next_id = 0

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        try:
            self._drain_and_check()
        finally:
            self.engine.shutdown()

    # -- rules ----------------------------------------------------------------------------------
    @rule(
        target=request_ids,
        prompt=prompts,
        params=sampling_params,
        which=st.integers(-2, len(ADAPTERS) - 1),  # -2: the corrupt adapter, -1: base model
    )
    def add(self, prompt, params, which):
        adapter = {-2: self.corrupt, -1: None}[which] if which < 0 else self.adapter_list[which]
        request_id = f"r{self.next_id}"
        self.next_id += 1
        if len(prompt) >= MAX_MODEL_LEN:
            with pytest.raises(RequestError, match="max_model_len"):
                self.engine.add_request(request_id, prompt, params, adapter)
            return multiple()  # rejected up front: never known to the engine
        self.engine.add_request(request_id, prompt, params, adapter)
        self.added[request_id] = (params.n, adapter)
        return request_id

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
        adapter = self.corrupt if which == -1 else self.adapter_list[which]
        if adapter is self.corrupt:
            with pytest.raises(ValueError, match=adapter.path):
                self.engine.prewarm(adapter, pin=pin)
            return
        if pin and len(self.pinned | {adapter.adapter_id}) >= MAX_LORAS:
            with pytest.raises(ValueError, match="cannot pin more than"):
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

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def blocks_are_free_or_owned_once(self):
        if not hasattr(self, "engine"):
            return
        blocks, scheduler = self.engine.blocks, self.engine.scheduler
        owned = [b for seq in scheduler.running for b in seq.block_table]
        everything = blocks.free_blocks + owned
        assert len(everything) == len(set(everything)), "a block is free and owned, or owned twice"
        assert sorted(everything) == list(range(NUM_BLOCKS)), "a block leaked"
        for seq in scheduler.running:
            assert seq.status is SequenceStatus.RUNNING
            assert seq.num_computed_tokens <= len(seq.block_table) * BLOCK_SIZE
        for seq in scheduler.waiting:
            assert seq.status is SequenceStatus.WAITING
            assert seq.block_table == [] and seq.num_computed_tokens == 0 and seq.slot == -1
        assert len(scheduler.running) <= 4  # max_num_seqs

    @invariant()
    def running_adapters_stay_in_their_slots(self):
        if not hasattr(self, "engine"):
            return
        adapters = self.engine.adapters
        in_slots = [a for a in adapters.slot_adapter if a is not None]
        assert len(in_slots) == len(set(in_slots)), f"an adapter is in two slots: {in_slots}"
        running = [s for s in self.engine.scheduler.running if s.adapter is not None]
        assert len({s.adapter_id for s in running}) <= MAX_LORAS
        for seq in running:
            assert adapters.slot_adapter[seq.slot] == seq.adapter_id, "in-use adapter evicted"
            (layer, name), lora_a = _fingerprint(self.engine, seq.adapter)
            in_slot = adapters.slots.linears[(layer, name)].lora_a[seq.slot, : lora_a.shape[0]]
            assert torch.equal(in_slot, lora_a), "an in-use slot was overwritten"
        for seq in self.engine.scheduler.running:
            if seq.adapter is None:
                assert seq.slot == -1
        assert adapters.pinned == self.pinned
        assert self.pinned <= set(adapters.host.ids()), "a pinned adapter left the host cache"

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
            self.blocks_are_free_or_owned_once()
            self.running_adapters_stay_in_their_slots()
        else:
            pytest.fail(f"still unfinished after {MAX_DRAIN_STEPS} steps: {self.engine.stats()}")
        assert self.engine.blocks.num_free == NUM_BLOCKS
        assert self.engine.requests == {}
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
    max_examples=30,
    stateful_step_count=35,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- BlockManager on its own ----------------------------------------------------------------------
def _seq(num_prompt_tokens: int = 1) -> Sequence:
    return Sequence("r", 0, [1] * num_prompt_tokens, SamplingParams(), None, arrival=0)


def test_blocks_needed_rounds_up_to_whole_blocks():
    blocks = BlockManager(num_blocks=8, block_size=4)
    seq = _seq()
    assert blocks.blocks_needed(seq, 1) == 1
    assert blocks.blocks_needed(seq, 4) == 1
    assert blocks.blocks_needed(seq, 5) == 2
    blocks.allocate(seq, 5)
    seq.num_computed_tokens = 5
    assert blocks.blocks_needed(seq, 3) == 0  # fits in the second block's free rows
    assert blocks.blocks_needed(seq, 4) == 1
    assert blocks.blocks_needed(seq, 0) == 0


def test_allocate_free_round_trip():
    blocks = BlockManager(num_blocks=8, block_size=4)
    a, b = _seq(), _seq()
    blocks.allocate(a, 9)
    blocks.allocate(b, 4)
    assert len(a.block_table) == 3 and len(b.block_table) == 1
    assert not set(a.block_table) & set(b.block_table)
    assert blocks.num_free == 4
    blocks.free(a)
    blocks.free(b)
    assert a.block_table == [] and b.block_table == []
    assert sorted(blocks.free_blocks) == list(range(8))


def test_allocate_beyond_capacity_raises():
    blocks = BlockManager(num_blocks=2, block_size=4)
    seq = _seq()
    assert blocks.can_allocate(seq, 8)
    assert not blocks.can_allocate(seq, 9)
    with pytest.raises(RuntimeError, match="can_allocate"):
        blocks.allocate(seq, 9)
    assert blocks.num_free == 2 and seq.block_table == []  # a refused allocation takes nothing


def test_corrupt_adapter_is_invalid_json():
    # Guards the state machine's premise: this directory fails to load, with its path named.
    _, _, corrupt = _assets()
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(corrupt.path, num_layers=2, module_shapes={}, max_rank=16)

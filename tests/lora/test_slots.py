"""Device slots and the host LRU cache."""

import pytest
import torch

from loraplex.lora.adapter import load_adapter
from loraplex.lora.modules import FUSED_LINEARS, TARGET_MODULES
from loraplex.lora.pages import PageError
from loraplex.lora.quantize import quantize
from loraplex.lora.slots import AdapterSlots, HostCache
from loraplex.model.loader import load_model
from tests.conftest import make_peft_adapter, tiny_llama


def slot_rows(slots, slot, module):
    """(A [layers, rank, in], Bt [layers, rank, out]) of a module in a slot: its own rows."""
    row, rank = slots.places[slot]
    path, i = slots.place[module]
    n = len(FUSED_LINEARS[path])
    start = n * row + i * rank
    return slots.a[path][:, start:start + rank], slots.b[module][:, row:row + rank]


def test_activate_overwrites_every_trace_of_the_previous_adapter(tiny_llama_dir, tmp_path):
    model = load_model(tiny_llama_dir, torch.float32, torch.device("cpu"))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = model.config.module_shapes()
    make_peft_adapter(tiny_llama(), tmp_path / "big", 16, 16, TARGET_MODULES)
    make_peft_adapter(tiny_llama(), tmp_path / "small", 4, 8, ["q_proj"])
    big = load_adapter(tmp_path / "big", num_layers=2, module_shapes=shapes, max_rank=16)
    small = load_adapter(tmp_path / "small", num_layers=2, module_shapes=shapes, max_rank=16)

    slots = AdapterSlots(model, max_loras=2, max_rank=16, page_rank=4)
    slots.activate(1, big)
    assert slots.places[1] == (0, 16) and slots.pages.num_free == 4
    slots.activate(1, small)  # a smaller adapter on fewer modules into the same slot
    assert slots.places[1][1] == 4 and slots.pages.num_free == 7  # rank 4: one page of 4
    small_pairs = dict(small.pairs())
    for layer in range(2):
        for module in TARGET_MODULES:
            a, b_t = slot_rows(slots, 1, module)
            if module == "q_proj":
                sa, sb = small_pairs[(layer, module)]
                assert torch.equal(a[layer], sa) and torch.equal(b_t[layer].T, sb)
            else:
                assert not a.any() and not b_t.any()
    # Nothing of big is left anywhere but in small's own rows.
    q_rows = slot_rows(slots, 1, "q_proj")
    assert sum(t.count_nonzero() for t in slots.buffers()) == sum(
        t.count_nonzero() for t in q_rows)
    # The model's layers read these buffers.
    attention = model.layers[0].self_attn.qkv_proj
    assert attention.lora_a.data_ptr() == slots.a["self_attn.qkv_proj"][0].data_ptr()
    # The base weights are never modified.
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k


def test_slots_take_the_pages_of_their_rank_and_compaction_keeps_their_weights(tiny_llama_dir,
                                                                               tmp_path):
    model = load_model(tiny_llama_dir, torch.float32, torch.device("cpu"))
    shapes = model.config.module_shapes()
    adapters = {}
    for rank in (4, 8, 16):
        make_peft_adapter(tiny_llama(), tmp_path / str(rank), rank, rank, TARGET_MODULES,
                          seed=rank)
        adapters[rank] = load_adapter(tmp_path / str(rank), num_layers=2, module_shapes=shapes,
                                      max_rank=16)
    # 8 pages of 4 rank rows.
    slots = AdapterSlots(model, max_loras=4, max_rank=16, num_pages=8, page_rank=4)
    for slot, rank in enumerate((4, 8, 4, 8)):
        slots.activate(slot, adapters[rank])
    assert [slots.places[s] for s in range(4)] == [(0, 4), (4, 8), (12, 4), (16, 8)]
    assert [slots.num_pages_of(s) for s in range(4)] == [1, 2, 1, 2]
    slots.deactivate(0)
    slots.deactivate(2)
    assert slots.pages.gaps() == [(0, 1), (3, 1), (6, 2)]
    slots.activate(2, adapters[4])  # best fit: a one-page gap, the two-page one stays whole
    assert slots.places[2] == (0, 4)
    slots.deactivate(2)
    # Rank 16 takes 4 pages: 4 are free, in no run of 4, so the slots move down first.
    slots.activate(0, adapters[16])
    assert slots.num_compactions == 1 and slots.pages.num_free == 0
    assert [slots.places[s] for s in (0, 1, 3)] == [(16, 16), (0, 8), (8, 8)]
    for slot, rank in ((0, 16), (1, 8), (3, 8)):
        for module in TARGET_MODULES:
            a, b_t = slot_rows(slots, slot, module)
            want_a, want_b = adapters[rank].modules[module]
            assert torch.equal(a, want_a) and torch.equal(b_t, want_b), (slot, module)
    with pytest.raises(PageError, match="needs 2 pages, 0 of 8 are free"):
        slots.activate(2, adapters[8])


def test_int8_slots_hold_each_module_quantized_and_clear_it_on_overwrite(tiny_llama_dir, tmp_path):
    model = load_model(tiny_llama_dir, torch.float32, torch.device("cpu"))
    shapes = model.config.module_shapes()
    make_peft_adapter(tiny_llama(), tmp_path / "big", 16, 16, ["q_proj", "down_proj"])
    make_peft_adapter(tiny_llama(), tmp_path / "small", 4, 8, ["q_proj"])
    big = load_adapter(tmp_path / "big", num_layers=2, module_shapes=shapes, max_rank=16)
    small = load_adapter(tmp_path / "small", num_layers=2, module_shapes=shapes, max_rank=16)

    slots = AdapterSlots(model, max_loras=2, max_rank=16, int8=True)
    assert all(t.dtype == torch.int8 for t in [*slots.a.values(), *slots.b.values()])
    slots.activate(0, big)
    slots.activate(0, small)
    row, rank = slots.places[0]
    a, b_t = slot_rows(slots, 0, "q_proj")
    scales = slots.scales["self_attn.qkv_proj"][:, 3 * row:3 * row + rank]
    qa, qb, qs = quantize(*small.modules["q_proj"])
    assert torch.equal(a, qa) and torch.equal(b_t, qb) and torch.equal(scales, qs)
    # nothing of big is left outside small's own rows
    assert sum(t.count_nonzero() for t in slots.buffers()) == sum(
        t.count_nonzero() for t in (a, b_t, scales))
    attention = model.layers[1].self_attn.qkv_proj
    assert attention.lora_scales.data_ptr() == slots.scales["self_attn.qkv_proj"][1].data_ptr()


def test_host_cache_evicts_least_recently_used_but_never_pinned():
    cache = HostCache(capacity=2)
    cache.add(1, "w1")
    cache.add(2, "w2")
    cache.pinned.add(1)
    cache.get(2)
    cache.add(3, "w3")  # 1 is pinned, so 2 goes although it was used more recently
    assert 1 in cache and 3 in cache and 2 not in cache
    cache.add(4, "w4")
    assert cache.ids() == [1, 4]

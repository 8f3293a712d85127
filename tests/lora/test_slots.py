"""Device slots and the host LRU cache."""

import torch

from loraplex.lora.adapter import load_adapter
from loraplex.lora.quantize import quantize
from loraplex.lora.slots import AdapterSlots, HostCache
from loraplex.model.loader import load_model
from tests.conftest import make_peft_adapter, tiny_llama


def test_activate_overwrites_every_trace_of_the_previous_adapter(tiny_llama_dir, tmp_path):
    model = load_model(tiny_llama_dir, torch.float32, torch.device("cpu"))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = model.config.module_shapes()
    all_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    make_peft_adapter(tiny_llama(), tmp_path / "big", 16, 16, all_modules)
    make_peft_adapter(tiny_llama(), tmp_path / "small", 4, 8, ["q_proj"])
    big = load_adapter(tmp_path / "big", num_layers=2, module_shapes=shapes, max_rank=16)
    small = load_adapter(tmp_path / "small", num_layers=2, module_shapes=shapes, max_rank=16)

    slots = AdapterSlots(model, max_loras=2, max_rank=16)
    slots.activate(1, big)
    slots.activate(1, small)  # a smaller adapter on fewer modules into the same slot
    small_pairs = dict(small.pairs())
    for layer in range(2):
        for module in all_modules:
            path, row = slots.place[module]
            a = slots.a[path][layer, 1, row:row + 16]  # [max_rank, in]
            b = slots.b[module][layer, 1].T  # [out, max_rank]
            if module == "q_proj":
                sa, sb = small_pairs[(layer, module)]
                assert torch.equal(a[:4], sa) and torch.equal(b[:, :4], sb)
                assert not a[4:].any() and not b[:, 4:].any()
            else:
                assert not a.any() and not b.any()
    # The model's layers read these buffers, and the other slot is untouched.
    attention = model.layers[0].self_attn.qkv_proj
    assert attention.lora_a.data_ptr() == slots.a["self_attn.qkv_proj"][0].data_ptr()
    assert not attention.lora_a[0].any() and not attention.lora_b[0][0].any()
    # The base weights are never modified.
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k


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
    for module in ("q_proj", "down_proj"):
        path, row = slots.place[module]
        a = slots.a[path][:, 0, row:row + 16]  # [layers, max_rank, in]
        b_t = slots.b[module][:, 0]
        scales = slots.scales[path][:, 0, row:row + 16]
        if module == "q_proj":
            sa, sb_t = small.modules["q_proj"]
            qa, qb, qs = quantize(sa, sb_t)
            assert torch.equal(a[:, :4], qa) and torch.equal(b_t[:, :4], qb)
            assert torch.equal(scales[:, :4], qs)
            a, b_t, scales = a[:, 4:], b_t[:, 4:], scales[:, 4:]
        assert not a.any() and not b_t.any() and not scales.any()  # nothing of big is left
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

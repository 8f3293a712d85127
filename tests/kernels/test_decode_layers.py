"""decode_layers (kernels/decode_layers.py): a decode-only step's layers as one C++ call give the
layer-by-layer fused path's results bit for bit (the same kernels in the same order), per
family, with adapters in the model's dtype and in int8; the engine uses it, and its greedy
tokens equal the reference path's; bad inputs are refused."""

import dataclasses

import pytest
import torch

from loraplex import LLM, SamplingParams
from loraplex.kernels import decode_layers
from loraplex.kernels.cpu import KernelError
from loraplex.lora.adapter import load_adapter
from loraplex.lora.ops import AdapterBatch
from loraplex.lora.slots import AdapterSlots
from loraplex.model.llama import AttentionMetadata, LlamaModel, PrefillChunk
from loraplex.model.loader import load_model
from loraplex.model.model_config import ModelConfig
from tests.kernels.test_cpu import needs_compiler
from tests.kernels.test_fused_stages import _randn
from tests.model.test_families import PROMPTS
from tests.model.test_families import family as family  # noqa: F401  (the checkpoints)

pytestmark = needs_compiler
ROWS_PER_SEQ = 32  # KV cache rows each test sequence owns


def _slots(model, adapter_dirs, int8: bool):
    slots = AdapterSlots(model, max_loras=len(adapter_dirs), max_rank=16, int8=int8)
    shapes, num_layers = model.config.module_shapes(), model.config.num_layers
    dtype = model.embed_tokens.weight.dtype
    for i, d in enumerate(adapter_dirs):
        slots.activate(i, load_adapter(d, num_layers=num_layers, module_shapes=shapes,
                                       max_rank=16, dtype=dtype))
    return slots


def _prefill(model, prompts, token_slots, places, kv_caches):
    """Each prompt's keys and values into its own rows (sequence b from b * ROWS_PER_SEQ)."""
    for b, (prompt, slot) in enumerate(zip(prompts, token_slots, strict=True)):
        n = len(prompt)
        attn = AttentionMetadata(torch.arange(n) + b * ROWS_PER_SEQ, 0, None, None,
                                 (PrefillChunk(0, n, n, None),))
        model(torch.tensor(prompt), torch.arange(n), kv_caches, attn,
              AdapterBatch.build([slot] * n, places, torch.device("cpu"), use_kernel=True),
              torch.tensor([n - 1]))


def _decode_step(model, prompts, token_slots, places, kv_caches, layers_kernel):
    """One decode step of every prompt (its next token: 7), returning its logits."""
    lens = [len(p) for p in prompts]
    width = max(lens) + 1
    rows = torch.stack([torch.arange(width) + b * ROWS_PER_SEQ for b in range(len(prompts))])
    attn = AttentionMetadata(
        slot_mapping=torch.tensor([b * ROWS_PER_SEQ + n for b, n in enumerate(lens)]),
        num_decode_tokens=len(prompts), decode_kv_indices=rows, decode_mask=None, prefills=(),
        decode_lens=torch.tensor([n + 1 for n in lens]))
    adapters = AdapterBatch.build(token_slots, places, torch.device("cpu"), use_kernel=True)
    return model(torch.full((len(prompts),), 7), torch.tensor(lens), kv_caches, attn,
                 adapters, torch.arange(len(prompts)), layers_kernel)


def _kv_caches(model, num_seqs):
    mc, dtype = model.config, model.embed_tokens.weight.dtype
    return [torch.zeros(2, num_seqs * ROWS_PER_SEQ, mc.num_kv_heads, mc.head_dim, dtype=dtype)
            for _ in range(mc.num_layers)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8", [False, True])
def test_one_call_equals_the_layer_by_layer_fused_path(family, dtype, int8):
    name, model_dir, adapter_dirs = family
    model = load_model(model_dir, dtype, torch.device("cpu"))
    model.use_fused_stages(True)
    if not decode_layers.takes_model(model, dtype, torch.device("cpu")):
        assert model.config.sandwich_norms, name  # Gemma 3 keeps the Python path
        return
    slots = _slots(model, adapter_dirs, int8)
    prompts, token_slots = PROMPTS[:5], [0, 1, -1, 2, 1]
    kv_caches = _kv_caches(model, len(prompts))
    _prefill(model, prompts, token_slots, slots.places, kv_caches)
    results = []
    for with_kernel in (False, True):
        caches = [c.clone() for c in kv_caches]
        kernel = decode_layers.DecodeLayers(model, caches) if with_kernel else None
        results.append((_decode_step(model, prompts, token_slots, slots.places, caches, kernel),
                        caches))
    (want, want_caches), (got, got_caches) = results
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip(got_caches, want_caches, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # The adapters act: the base model alone gives other logits for the adapter rows.
    caches = [c.clone() for c in kv_caches]
    base = _decode_step(model, prompts, [-1] * 5, slots.places, caches,
                        decode_layers.DecodeLayers(model, caches))
    assert not torch.equal(base[0], got[0]) and torch.equal(base[2], got[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_biases_and_no_adapters(dtype):
    """Qwen2's q/k/v biases, and a step without adapters (no LoRA segments)."""
    config = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                         rope_theta=1e4, max_position_embeddings=128, tie_word_embeddings=False,
                         qkv_bias=True)
    gen = torch.Generator().manual_seed(0)
    model = LlamaModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(_randn(gen, *p.shape, dtype=torch.float32) * 0.3)
    model = model.to(dtype)
    model.use_fused_stages(True)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    kv_caches = _kv_caches(model, 2)
    _prefill(model, prompts, [-1, -1], [], kv_caches)
    results = []
    for with_kernel in (False, True):
        caches = [c.clone() for c in kv_caches]
        kernel = decode_layers.DecodeLayers(model, caches) if with_kernel else None
        results.append(_decode_step(model, prompts, [-1, -1], [], caches, kernel))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    assert model.layers[0].self_attn.qkv_proj.bias.any()


def test_the_engine_decodes_through_it_and_matches_the_reference(family, monkeypatch):
    """The engine builds it at the first decode step (float32, CPU) and runs its decode steps
    through it; the greedy tokens and log-probs equal the reference path's."""
    name, model_dir, adapter_dirs = family
    calls = []
    real_call = decode_layers.DecodeLayers.__call__
    monkeypatch.setattr(decode_layers.DecodeLayers, "__call__",
                        lambda self, *a: calls.append(1) or real_call(self, *a))
    llm = LLM(str(model_dir), kv_cache_bytes=1 << 22, max_loras=3)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    adapters = [adapter_dirs[0], adapter_dirs[1], None]
    fast = llm.generate(PROMPTS[:3], params, adapters=adapters)
    if not llm.engine.runner.use_layers_kernel:
        assert "gemma3" in name and not calls
        return
    assert calls, name
    llm.engine.runner.model.use_fused_stages(False)  # the reference path, layer by layer
    reference = llm.generate(PROMPTS[:3], params, adapters=adapters)
    for a, b in zip(fast, reference, strict=True):
        assert a.error is None and a.token_ids == b.token_ids, name
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


def test_bad_inputs_are_refused(family):
    name, model_dir, adapter_dirs = family
    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    if not decode_layers.takes_model(model, torch.float32, torch.device("cpu")):
        return
    model.use_fused_stages(True)
    kv_caches = _kv_caches(model, 1)
    kernel = decode_layers.DecodeLayers(model, kv_caches)
    x = torch.zeros(1, model.config.hidden_size)
    cos = sin = torch.ones(1, model.config.head_dim)
    attn = AttentionMetadata(torch.tensor([ROWS_PER_SEQ]), 1, torch.arange(4)[None], None, (),
                             torch.tensor([4]))  # its new key's row is past the cache's end
    with pytest.raises(KernelError, match="out of range"):
        kernel(x, cos, sin, attn, None)
    attn = dataclasses.replace(attn, slot_mapping=torch.tensor([3]),
                               decode_lens=torch.tensor([4, 4]))
    with pytest.raises(KernelError, match="unexpected"):
        kernel(x, cos, sin, attn, None)
    with pytest.raises(KernelError, match="unexpected"):
        kernel(x.double(), cos, sin, dataclasses.replace(attn, decode_lens=torch.tensor([4])),
               None)
    assert not decode_layers.takes_step(torch.zeros(2, 8), attn, None)  # 1 decode, 2 tokens


def test_can_be_turned_off(family, monkeypatch):
    name, model_dir, _ = family
    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    monkeypatch.setenv(decode_layers.ENV, "0")
    assert not decode_layers.takes_model(model, torch.float32, torch.device("cpu"))

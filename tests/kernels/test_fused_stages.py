"""The fused stages (kernels/fused_stages.py) against model/llama.py's PyTorch reference ops, one
stage at a time and as a whole model per family, in float32 and bfloat16."""

import dataclasses

import pytest
import torch

from loraplex import LLM, SamplingParams
from loraplex.kernels import fused_stages
from loraplex.kernels.cpu import KernelError
from loraplex.model.llama import ACTIVATIONS, Attention, RMSNorm
from loraplex.model.loader import load_model
from loraplex.model.model_config import ModelConfig
from tests.conftest import prefill_logits
from tests.kernels.test_cpu import needs_compiler
from tests.model.test_families import PROMPTS
from tests.model.test_families import family as family  # noqa: F401  (the checkpoints)

pytestmark = needs_compiler
DTYPES = [torch.float32, torch.bfloat16]
# The kernels round where the reference rounds; what differs is the order of the float32 sums
# (mean of squares) and exp/tanh's last bit, so an output may sit one bf16 step (2^-8) away.
TOLERANCES = {torch.float32: {"rtol": 1e-5, "atol": 1e-5},
              torch.bfloat16: {"rtol": 8e-3, "atol": 8e-3}}


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen).to(dtype)


def _pair(module):
    """(reference, fused) runs of the same module."""
    def run(fused, *args):
        module.fused = fused
        try:
            return module(*args)
        finally:
            module.fused = False
    return lambda *args: run(False, *args), lambda *args: run(True, *args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 40])  # 40: split across threads
def test_rms_norm_and_the_residual_add_match_the_reference(dtype, unit_offset, rows):
    gen = torch.Generator().manual_seed(rows)
    norm = RMSNorm(72, 1e-6, unit_offset)
    norm.weight.data = _randn(gen, 72, dtype=dtype) * 0.5 + (0 if unit_offset else 1)
    x = _randn(gen, rows, 72 + 8, dtype=dtype)[:, :72] * 3  # rows wider than they are
    h = _randn(gen, rows, 72, dtype=dtype)
    reference, fused = _pair(norm)
    torch.testing.assert_close(fused(x), reference(x), **TOLERANCES[dtype])
    norm.fused = False
    want_x, want = norm.add_and_norm(x, h)
    norm.fused = True
    got_x, got = norm.add_and_norm(x.clone(), h)
    torch.testing.assert_close(got_x, want_x, rtol=0, atol=0)  # one rounded add, exactly
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])


def _attention(family_config, dtype, gen):
    attention = Attention(family_config).to(dtype)
    for norm in (attention.q_norm, attention.k_norm):
        if norm is not None:
            norm.weight.data = _randn(gen, family_config.head_dim, dtype=dtype) * 0.3 + 1
    return attention


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_rope_and_the_kv_cache_write_match_the_reference(tiny_config, dtype, qk_norm, tokens):
    gen = torch.Generator().manual_seed(tokens)
    config = dataclasses.replace(tiny_config, qk_norm=qk_norm)
    attention = _attention(config, dtype, gen)
    heads, kv_heads, dim = config.num_heads, config.num_kv_heads, config.head_dim
    qkv = _randn(gen, tokens, (heads + 2 * kv_heads) * dim + 4, dtype=dtype)[:, :-4]
    angles = torch.rand(tokens, dim // 2, generator=gen) * 50
    cos, sin = (torch.cat((f(angles), f(angles)), -1).to(dtype) for f in (torch.cos, torch.sin))
    slots = torch.randperm(64, generator=gen)[:tokens]
    caches = [torch.zeros(2, 64, kv_heads, dim, dtype=dtype) for _ in range(2)]
    results = []
    for fused, cache in zip((False, True), caches, strict=True):
        attention.fused = fused
        results.append(attention._rope_and_cache(qkv, cos, sin, cache, slots))
    torch.testing.assert_close(results[1], results[0], **TOLERANCES[dtype])
    torch.testing.assert_close(caches[1], caches[0], **TOLERANCES[dtype])
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    assert caches[1][1, slots].abs().sum() > 0 and not caches[1][:, untouched].any()


def test_rope_refuses_a_cache_row_out_of_range(tiny_config):
    heads, kv_heads, dim = tiny_config.num_heads, tiny_config.num_kv_heads, tiny_config.head_dim
    qkv = torch.randn(2, (heads + 2 * kv_heads) * dim)
    cos = sin = torch.ones(2, dim)
    cache = torch.zeros(2, 8, kv_heads, dim)
    with pytest.raises(KernelError, match="out of range"):
        fused_stages.rope_kv(qkv, cos, sin, heads, kv_heads, None, None, 0.0, False, cache,
                             torch.tensor([3, 8]))
    assert cache.abs().sum() == 0  # nothing written


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("rows", [1, 40])
def test_gated_activation_matches_the_reference(tiny_config, dtype, activation, rows):
    gen = torch.Generator().manual_seed(rows)
    gate_up = _randn(gen, rows, 2 * tiny_config.intermediate_size, dtype=dtype) * 3
    gate, up = gate_up.chunk(2, dim=-1)
    want = ACTIVATIONS[activation](gate) * up
    got = fused_stages.gated_act(gate_up, activation)
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])


@pytest.fixture
def tiny_config():
    return ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                       rope_theta=1e4, max_position_embeddings=128, tie_word_embeddings=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_whole_model_prefill_matches_the_reference_for_each_family(family, dtype):
    """Every family's features (qk norms, sandwich norms, GeGLU, unit-offset norms) through
    the fused stages give the reference path's logits."""
    name, model_dir, _ = family
    model = load_model(model_dir, dtype, torch.device("cpu"))
    want = prefill_logits(model, PROMPTS)
    model.use_fused_stages(True)
    got = prefill_logits(model, PROMPTS)
    for g, w in zip(got, want, strict=True):
        scale = w.abs().max().item()
        tol = 1e-4 if dtype == torch.float32 else 0.06 * scale  # test_llm's bf16 line
        assert (g - w).abs().max().item() <= tol, (name, dtype)


def test_engine_decodes_through_the_fused_stages(family):
    """The engine turns them on (float32, CPU); its greedy tokens equal the reference
    model's, decode steps included."""
    name, model_dir, _ = family
    llm = LLM(str(model_dir), kv_cache_bytes=1 << 22)
    runner_model = llm.engine.runner.model
    assert runner_model.layers[0].mlp.fused, name
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    fused = llm.generate(PROMPTS[:3], params)
    runner_model.use_fused_stages(False)
    reference = llm.generate(PROMPTS[:3], params)
    for a, b in zip(fused, reference, strict=True):
        assert a.token_ids == b.token_ids, name
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


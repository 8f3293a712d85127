"""float32_matmul (kernels/float32_matmul.py) against exact sums and F.linear, when the fused path
takes it, and a whole model's prefill through it against the reference path."""

import pytest
import torch
import torch.nn.functional as F

from loraplex.kernels import cpu as cpu_kernel
from loraplex.kernels import float32_matmul
from loraplex.model import llama
from loraplex.model.loader import load_model
from tests.conftest import prefill_logits
from tests.kernels.test_cpu import needs_compiler
from tests.model.test_families import family as family  # noqa: F401  (the checkpoints)


@pytest.fixture
def without_bf16_dot(monkeypatch):
    """As on a CPU without bfloat16 dot products, whatever this one has."""
    monkeypatch.setattr(cpu_kernel, "has_bf16_dot", lambda: False)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [None, 7])  # 7: the weight converted in uneven pieces
def test_matches_the_exact_sums_rounded_once(monkeypatch, bias, chunk_rows):
    gen = torch.Generator().manual_seed(3)
    rows, in_features, out_features = 50, 577, 131
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    b = torch.randn(out_features, generator=gen).bfloat16() if bias else None
    if chunk_rows:
        monkeypatch.setattr(float32_matmul, "CHUNK_BYTES", chunk_rows * 4 * in_features)
    got = float32_matmul.linear(x, weight, b)
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    # float32 sums of ~sqrt(577)-sized values, then one rounding to bf16 (2^-8 relative)
    torch.testing.assert_close(got.double(), exact, rtol=8e-3, atol=0.05)
    want = F.linear(x, weight, b)
    assert (got != want).float().mean() < 0.05  # PyTorch differs only where sums round apart
    if chunk_rows:  # the pieces change nothing
        monkeypatch.undo()
        assert torch.equal(got, float32_matmul.linear(x, weight, b))


def test_takes_many_bf16_rows_on_a_cpu_without_bf16_dot(without_bf16_dot):
    w = torch.zeros(8, 8, dtype=torch.bfloat16)
    many = torch.zeros(float32_matmul.MIN_ROWS, 8, dtype=torch.bfloat16)
    assert float32_matmul.takes(many, w)
    assert not float32_matmul.takes(many[:-1], w)  # too few rows to pay the conversion
    assert not float32_matmul.takes(many.float(), w.float())  # float32 is PyTorch's already
    assert not float32_matmul.takes(many, w.float())


def test_a_cpu_with_bf16_dot_keeps_pytorchs_gemm(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "has_bf16_dot", lambda: True)
    many = torch.zeros(float32_matmul.MIN_ROWS, 8, dtype=torch.bfloat16)
    assert not float32_matmul.takes(many, torch.zeros(8, 8, dtype=torch.bfloat16))


def test_has_bf16_dot_reads_the_cpu_flags(monkeypatch):
    for flags, expected in [("flags : fpu avx512f avx512_vnni", False),
                            ("flags : fpu avx512f avx512_bf16", True),
                            ("flags : fpu amx_bf16 amx_tile", True),
                            ("Features : fp asimd bf16 i8mm", True)]:
        monkeypatch.setattr(cpu_kernel, "_cpu_flags", lambda f=flags: f)
        cpu_kernel.has_bf16_dot.cache_clear()
        assert cpu_kernel.has_bf16_dot() is expected, flags
    cpu_kernel.has_bf16_dot.cache_clear()


@needs_compiler
def test_fused_linear_picks_by_rows(without_bf16_dot, monkeypatch):
    """A few rows: linear_rows; many bf16 rows: float32_matmul; float32: PyTorch's."""
    calls = []
    for module in ("linear_rows", "float32_matmul"):
        kernel = getattr(llama, module)
        monkeypatch.setattr(kernel, "linear", lambda *a, m=module, f=kernel.linear: (
            calls.append(m), f(*a))[1])
    w = torch.randn(16, 8).bfloat16()
    llama.fused_linear(torch.randn(2, 8).bfloat16(), w)
    llama.fused_linear(torch.randn(float32_matmul.MIN_ROWS, 8).bfloat16(), w)
    llama.fused_linear(torch.randn(float32_matmul.MIN_ROWS, 8), w.float())
    assert calls == ["linear_rows", "float32_matmul"]


@needs_compiler
def test_whole_model_prefill_through_it_matches_the_reference(family, without_bf16_dot):
    """A prefill of 90 rows in bf16 (every layer's matmuls by float32_matmul) gives the reference
    path's logits, for every family."""
    name, model_dir, _ = family
    model = load_model(model_dir, torch.bfloat16, torch.device("cpu"))
    gen = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (30,), generator=gen).tolist() for _ in range(3)]
    want = prefill_logits(model, prompts)
    model.use_fused_stages(True)
    got = prefill_logits(model, prompts)
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max().item() <= 0.06 * w.abs().max().item(), name  # test_llm's line

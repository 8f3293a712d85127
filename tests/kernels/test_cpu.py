"""The CPU kernel of the LoRA op: against the reference, its checks, its build."""

import logging
import os
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex.kernels import cpu as cpu_kernel
from loraplex.lora.ops import NO_ADAPTER, AdapterBatch, add_lora, add_lora_reference

CPU = torch.device("cpu")
HAS_COMPILER = bool(os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++"))
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler on this machine")
# The reference runs in float32 on the same (rounded) inputs; the kernel sums in float32 in its
# own order, and in bfloat16 rounds the result once: 2^-8 on terms of size ~1.
TOLERANCES = {torch.float32: {"rtol": 1e-5, "atol": 1e-5},
              torch.bfloat16: {"rtol": 1.6e-2, "atol": 3e-2}}


def random_layer(gen, num_tokens, out_sizes, dtype, num_slots=12, rank=8, d_in=40):
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    # x as a view with a row stride wider than its rows, as the model's inputs may be.
    x = randn(num_tokens, d_in + 3)[:, :d_in]
    y = randn(num_tokens, sum(out_sizes))
    # Scaled so that shrink and delta are of size ~1, as in a model.
    lora_a = randn(num_slots, len(out_sizes) * rank, d_in, scale=d_in ** -0.5)
    lora_b = tuple(randn(num_slots, rank, out, scale=rank ** -0.5) for out in out_sizes)
    return x, y, lora_a, lora_b


@needs_compiler
@settings(max_examples=100, deadline=None)
@given(
    # (slot, run length): single tokens (decodes), short runs and long runs (prefill) mixed;
    # groups of 8 tokens share weight loads, so lengths cover whole and partial groups.
    runs=st.lists(st.tuples(st.integers(min_value=NO_ADAPTER, max_value=11), st.integers(1, 20)),
                  min_size=1, max_size=10),
    seed=st.integers(0, 2**16),
    # one module, fused q/k/v, gate/up; 300 columns span two of the kernel's column blocks
    # and every width of its column loops (8, 4, 2 or 1 vectors at a time, then a tail)
    out_sizes=st.sampled_from([(10,), (10, 6, 6), (7, 7), (300, 20), (32, 48)]),
    d_in=st.sampled_from([40, 64]),  # with and without a tail after the 16-wide loops
    # rows of A go 8, 4, 2 or 1 at a time by group size: ranks leave partial blocks of rows
    rank=st.sampled_from([3, 8, 11]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_kernel_path_matches_reference(runs, seed, out_sizes, d_in, rank, dtype):
    assert cpu_kernel.is_available(dtype, CPU)
    token_slots = [slot for slot, length in runs for _ in range(length)]
    gen = torch.Generator().manual_seed(seed)
    x, y, lora_a, lora_b = random_layer(gen, len(token_slots), out_sizes, dtype,
                                         rank=rank, d_in=d_in)
    want = add_lora_reference(y.float(), x.float(), lora_a.float(),
                              tuple(b.float() for b in lora_b), torch.tensor(token_slots))
    batch = AdapterBatch.build(token_slots, CPU, use_kernel=True)
    if batch is None:
        assert all(s == NO_ADAPTER for s in token_slots)
        return
    assert batch.runs == () and batch.piece_tokens is None  # every token went to the kernel
    got = add_lora(y.clone(), x, lora_a, lora_b, batch)
    torch.testing.assert_close(got.float(), want, **TOLERANCES[dtype])


@needs_compiler
def test_kernel_segments_are_the_same_slot_stretches():
    batch = AdapterBatch.build([3, 3, NO_ADAPTER, 0] + [5] * 8 + [3], CPU, use_kernel=True)
    assert batch.kernel_segments.tolist() == [[3, 0, 2], [0, 3, 4], [5, 4, 12], [3, 12, 13]]
    assert AdapterBatch.build([NO_ADAPTER] * 3, CPU, use_kernel=True) is None


@needs_compiler
def test_kernel_refuses_out_of_range_indices_and_bad_layouts_without_writing():
    gen = torch.Generator().manual_seed(0)
    x, y, lora_a, lora_b = random_layer(gen, 4, (10, 6), torch.float32)
    before = y.clone()
    # (slot, start, end): slot 12 of 12, slot -1, past the last token, empty, backwards
    for bad in ([0, 0, 2], [12, 2, 4]), ([-1, 0, 1],), ([1, 2, 5],), ([1, 2, 2],), ([1, 3, 1],):
        with pytest.raises(cpu_kernel.KernelError, match="out of range"):
            cpu_kernel.add_lora_segments(y, x, lora_a, lora_b, torch.tensor(bad))
    assert torch.equal(y, before)
    good = torch.tensor([[0, 0, 4]])
    with pytest.raises(cpu_kernel.KernelError, match="layout"):  # B not transposed
        cpu_kernel.add_lora_segments(y, x, lora_a, tuple(b.transpose(1, 2) for b in lora_b), good)
    with pytest.raises(cpu_kernel.KernelError, match="dtype"):
        cpu_kernel.add_lora_segments(y.double(), x, lora_a, lora_b, good)
    assert not cpu_kernel.is_available(torch.float64, CPU)
    assert not cpu_kernel.is_available(torch.float32, torch.device("meta"))


@needs_compiler
def test_build_is_cached_per_machine_and_a_failing_compiler_falls_back(tmp_path, monkeypatch,
                                                                       caplog):
    monkeypatch.delenv(cpu_kernel.CACHE_ENV, raising=False)
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    first = cpu_kernel._build(compiler)
    assert first.parent == tmp_path / cpu_kernel.CACHE_DIR
    built_at = first.stat().st_mtime_ns
    assert cpu_kernel._build(compiler) == first and first.stat().st_mtime_ns == built_at
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left over

    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    cpu_kernel._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="loraplex.kernels.cpu"):
            assert not cpu_kernel.is_available(torch.float32, CPU)
        assert "could not be built" in caplog.text and "plain PyTorch" in caplog.text
        monkeypatch.setenv(cpu_kernel.KERNEL_ENV, "0")
        cpu_kernel._library.cache_clear()
        assert not cpu_kernel.is_available(torch.float32, CPU)
    finally:
        monkeypatch.undo()
        cpu_kernel._library.cache_clear()
    assert cpu_kernel.is_available(torch.float32, CPU)


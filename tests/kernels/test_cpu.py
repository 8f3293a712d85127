"""The CPU kernels (LoRA op, decode attention): against references, their checks, their build."""

import logging
import os
import platform
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex.kernels import cpu as cpu_kernel
from loraplex.lora.ops import NO_ADAPTER, AdapterBatch, add_lora, add_lora_reference
from tests.lora.paged import paged_layer

CPU = torch.device("cpu")
HAS_COMPILER = bool(os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++"))
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler on this machine")
# The reference runs in float32 on the same (rounded) inputs; the kernel sums in float32 in its
# own order, and in bfloat16 rounds the result once: 2^-8 on terms of size ~1.
TOLERANCES = {torch.float32: {"rtol": 1e-5, "atol": 1e-5},
              torch.bfloat16: {"rtol": 1.6e-2, "atol": 3e-2}}
# Against int8 weights the reference takes them exactly (dequantized); the kernel takes float32
# inputs and h as int16 (2^-16 of the largest, summed over up to 64 terms) where the CPU has int16
# dot products.
INT8_TOLERANCES = {torch.float32: {"rtol": 1e-3, "atol": 1e-3},
                   torch.bfloat16: TOLERANCES[torch.bfloat16]}


def random_layer(gen, num_tokens, out_sizes, dtype, ranks, d_in=40, int8=False):
    """(x, y, places, lora_a, lora_b, scales) of a paged layer with slot s of rank ranks[s]
    (tests/lora/paged.py: rows no slot owns hold NaN)."""
    places, lora_a, lora_b, scales = paged_layer(gen, ranks, out_sizes, d_in, torch.float32,
                                                 int8)
    # x as a view with a row stride wider than its rows, as the model's inputs may be.
    x = torch.randn(num_tokens, d_in + 3, generator=gen).to(dtype)[:, :d_in]
    y = torch.randn(num_tokens, sum(out_sizes), generator=gen).to(dtype)
    if not int8:
        lora_a, lora_b = lora_a.to(dtype), tuple(b.to(dtype) for b in lora_b)
    return x, y, places, lora_a, lora_b, scales


def assert_kernel_matches_reference(token_slots, gen, out_sizes, dtype, rank, d_in, threads=None,
                                    int8=False):
    """add_lora's kernel path on a random layer (with `threads` OpenMP threads, with the
    weights as int8 if `int8`) against the float32 reference; `rank`: every slot's, or a list
    of each slot's (mixed ranks)."""
    ranks = rank if isinstance(rank, list) else [rank] * 12
    x, y, places, lora_a, lora_b, scales = random_layer(gen, len(token_slots), out_sizes, dtype,
                                                        ranks, d_in, int8)
    want = add_lora_reference(y.float(), x.float(), lora_a.float(),
                              tuple(b.float() for b in lora_b), torch.tensor(token_slots),
                              places, scales)
    batch = AdapterBatch.build(token_slots, places, CPU, use_kernel=True)
    assert batch.runs == () and batch.pieces == ()  # every token went to the kernel
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        got = add_lora(y.clone(), x, lora_a, lora_b, batch, scales)
    finally:
        torch.set_num_threads(before)
    tolerances = INT8_TOLERANCES if int8 else TOLERANCES
    torch.testing.assert_close(got.float(), want, **tolerances[dtype])


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
    # rows of A go 8, 4, 2 or 1 at a time by group size: ranks leave partial blocks of rows;
    # a list: each slot its own rank (0: an empty slot, whose tokens add nothing)
    rank=st.sampled_from([3, 8, 11]) | st.lists(st.sampled_from([0, 1, 5, 8, 16]),
                                                min_size=12, max_size=12),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    int8=st.booleans(),  # adapter weights in the inputs' dtype, or int8 with scales
)
def test_kernel_path_matches_reference(runs, seed, out_sizes, d_in, rank, dtype, int8):
    assert cpu_kernel.is_available(dtype, CPU)
    token_slots = [slot for slot, length in runs for _ in range(length)]
    ranks = rank if isinstance(rank, list) else [rank] * 12
    if all(s == NO_ADAPTER or ranks[s] == 0 for s in token_slots):
        assert AdapterBatch.build(token_slots, [(0, r) for r in ranks], CPU,
                                  use_kernel=True) is None
        return
    assert_kernel_matches_reference(token_slots, torch.Generator().manual_seed(seed), out_sizes,
                                    dtype, rank, d_in, int8=int8)


@needs_compiler
@settings(max_examples=60, deadline=None)
@given(
    # Decoding steps: one or two tokens on a slot, slots recurring apart; fewer segments than
    # threads go the split way, more are each one thread's whole task, prefetching the next.
    runs=st.lists(st.tuples(st.integers(0, 11), st.integers(1, 2)), min_size=1, max_size=24),
    seed=st.integers(0, 2**16),
    # 2100 columns: more than a decoding task sums at once
    out_sizes=st.sampled_from([(10,), (10, 6, 6), (2100,), (48, 33)]),
    d_in=st.sampled_from([40, 64]),
    rank=st.sampled_from([3, 8, 11])  # odd: the last row of B alone
    | st.lists(st.sampled_from([1, 8, 16, 32]), min_size=12, max_size=12),  # mixed
    threads=st.sampled_from([1, 2, 3]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    int8=st.booleans(),
)
def test_decoding_steps_match_reference(runs, seed, out_sizes, d_in, rank, threads, dtype, int8):
    token_slots = [slot for slot, length in runs for _ in range(length)]
    assert_kernel_matches_reference(token_slots, torch.Generator().manual_seed(seed), out_sizes,
                                    dtype, rank, d_in, threads, int8)


@needs_compiler
@pytest.mark.parametrize("int8", [False, True])
def test_a_rank_past_the_pair_expands_takes_the_float32_loops(int8):
    """The bf16 and int8 expands take ranks up to 256 (pairs of h on the stack); larger ones,
    which max_lora_rank allows, go through the float32 loops, prefill and decode alike."""
    assert_kernel_matches_reference([2] * 9 + [5, 7, 1], torch.Generator().manual_seed(0),
                                    (40, 20), torch.bfloat16, rank=260, d_in=40, int8=int8)


@needs_compiler
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86 build flag")
def test_kernel_built_without_bf16_or_int16_dot_products_matches_reference(tmp_path, monkeypatch):
    """CPUs without AVX512_BF16 take bf16 through float32 copies of the inputs, made once a call,
    and without AVX512_VNNI int8 weights through float32 multiply-adds: the library built for
    such a CPU, on decoding and prefill steps."""
    monkeypatch.setattr(cpu_kernel, "FLAGS",
                        [*cpu_kernel.FLAGS, "-mno-avx512bf16", "-mno-avx512vnni"])
    monkeypatch.setenv(cpu_kernel.CACHE_ENV, str(tmp_path))
    cpu_kernel._library.cache_clear()
    try:
        gen = torch.Generator().manual_seed(0)
        for token_slots in ([3, 5, 5, 0, 7, 2, 9], [4] * 19 + [1, 1, 6]):
            for rank, d_in, out_sizes in ((8, 40, (300, 20)), (3, 64, (10, 6, 6))):
                for dtype, int8 in ((torch.bfloat16, False), (torch.bfloat16, True),
                                    (torch.float32, True)):
                    assert_kernel_matches_reference(token_slots, gen, out_sizes, dtype, rank,
                                                    d_in, int8=int8)
        assert len(list(tmp_path.glob("*.so"))) == 1  # the library built for such a CPU
    finally:
        monkeypatch.undo()
        cpu_kernel._library.cache_clear()


@needs_compiler
def test_kernel_segments_are_the_same_slot_stretches():
    places = [(0, 8)] * 6
    batch = AdapterBatch.build([3, 3, NO_ADAPTER, 0] + [5] * 8 + [3], places, CPU,
                               use_kernel=True)
    assert batch.kernel_segments.tolist() == [[3, 0, 2], [0, 3, 4], [5, 4, 12], [3, 12, 13]]
    assert batch.kernel_places.tolist() == [[0, 8]] * 6
    assert AdapterBatch.build([NO_ADAPTER] * 3, places, CPU, use_kernel=True) is None


@needs_compiler
def test_kernel_refuses_out_of_range_indices_and_bad_layouts_without_writing():
    gen = torch.Generator().manual_seed(0)
    x, y, places, lora_a, lora_b, _ = random_layer(gen, 4, (10, 6), torch.float32, [8] * 12)
    places = torch.tensor(places)
    num_rows = lora_b[0].shape[0]
    before = y.clone()
    # (slot, start, end): slot 12 of 12, slot -1, past the last token, empty, backwards
    for bad in ([0, 0, 2], [12, 2, 4]), ([-1, 0, 1],), ([1, 2, 5],), ([1, 2, 2],), ([1, 3, 1],):
        with pytest.raises(cpu_kernel.KernelError, match="out of range"):
            cpu_kernel.add_lora_segments(y, x, lora_a, lora_b, torch.tensor(bad), places)
    good = torch.tensor([[0, 0, 4]])
    # A slot's rows past the buffers, before them, or of rank 0.
    for place in ([num_rows - 7, 8], [-1, 8], [0, 0]):
        bad_places = places.clone()
        bad_places[0] = torch.tensor(place)
        with pytest.raises(cpu_kernel.KernelError, match="out of range"):
            cpu_kernel.add_lora_segments(y, x, lora_a, lora_b, good, bad_places)
    assert torch.equal(y, before)
    with pytest.raises(cpu_kernel.KernelError, match="layout"):  # B not transposed
        cpu_kernel.add_lora_segments(y, x, lora_a, tuple(b.T for b in lora_b), good, places)
    with pytest.raises(cpu_kernel.KernelError, match="dtype"):
        cpu_kernel.add_lora_segments(y.double(), x, lora_a, lora_b, good, places)
    with pytest.raises(cpu_kernel.KernelError, match="shape"):  # places not [slots, 2]
        cpu_kernel.add_lora_segments(y, x, lora_a, lora_b, good, places[:, :1].contiguous())
    _, _, _, a8, b8, scales = random_layer(gen, 4, (10, 6), torch.float32, [8] * 12, int8=True)
    for bad_weights in ((lora_a, lora_b, scales),  # float weights with scales
                        (a8, b8, scales[:-1]),  # a scale short
                        (a8, b8, scales.double())):
        with pytest.raises(cpu_kernel.KernelError, match="dtype"):
            cpu_kernel.add_lora_segments(y, x, bad_weights[0], bad_weights[1], good, places,
                                         bad_weights[2])
    with pytest.raises(cpu_kernel.KernelError, match="dtype"):  # int8 weights without scales
        cpu_kernel.add_lora_segments(y, x, a8, b8, good, places)
    assert torch.equal(y, before)
    assert not cpu_kernel.is_available(torch.float64, CPU)
    assert not cpu_kernel.is_available(torch.float32, torch.device("meta"))


@needs_compiler
def test_a_bound_kernel_checks_each_calls_inputs_against_its_buffers():
    """LoraKernel checks the slot buffers once; every call still checks its own x, y and
    segments against them (a layer's kernel is bound at attach, lora/slots.py)."""
    gen = torch.Generator().manual_seed(1)
    x, y, places, lora_a, lora_b, _ = random_layer(gen, 4, (10, 6), torch.float32, [8] * 12)
    places, good = torch.tensor(places), torch.tensor([[0, 0, 2], [3, 2, 4]])
    kernel = cpu_kernel.LoraKernel(lora_a, lora_b)
    got = y.clone()
    kernel(got, x, good, places)
    want = y.clone()
    cpu_kernel.add_lora_segments(want, x, lora_a, lora_b, good, places)
    assert torch.equal(got, want) and not torch.equal(got, y)
    for bad_y, bad_x in ((y, x.to(torch.bfloat16)),  # not the buffers' dtype
                         (y, torch.randn(4, 41)),  # not their in_features
                         (y[:, :-1], x),  # not their out_features
                         (y[:3], x)):  # not a row of y per token
        with pytest.raises(cpu_kernel.KernelError, match="dtype, shape or layout"):
            kernel(bad_y.clone(), bad_x, good, places)
    with pytest.raises(cpu_kernel.KernelError, match="layout"):  # segments not int64
        kernel(y.clone(), x, good.int(), places)


def random_cache(gen, lens, num_kv_heads, head_dim, dtype, block_size=4):
    """A layer's KV cache [2, rows, kv_heads, head_dim] with each sequence's blocks scattered
    over it in random order, and the rows of every sequence's tokens [num_seqs, width]."""
    blocks_each = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks_each) + 3  # some blocks no sequence owns
    order = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(blocks_each) * block_size
    rows = torch.zeros(len(lens), width + 5, dtype=torch.int64)  # wider than needed: a view
    for b, count in enumerate(blocks_each):
        owned = [order.pop() for _ in range(count)]
        rows[b, : count * block_size] = torch.tensor(
            [block * block_size + i for block in owned for i in range(block_size)])
    kv = torch.randn(2, num_blocks * block_size, num_kv_heads, head_dim, generator=gen)
    return kv.to(dtype), rows[:, :width]


def attention_reference(q, kv, rows, lens):
    """Per sequence and head, in float64: softmax(q . K / sqrt(d)) @ V over its own rows."""
    num_seqs, num_heads, head_dim = q.shape
    group = num_heads // kv.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(num_seqs):
        keys = kv[0, rows[b, : lens[b]]].double()  # [len, kv_heads, dim]
        values = kv[1, rows[b, : lens[b]]].double()
        for h in range(num_heads):
            scores = keys[:, h // group] @ q[b, h].double() * head_dim**-0.5
            out[b, h] = scores.softmax(0) @ values[:, h // group]
    return out


@needs_compiler
@settings(max_examples=60, deadline=None)
@given(
    lens=st.lists(st.integers(1, 70), min_size=1, max_size=6),  # 1 token; within and past 16
    heads=st.sampled_from([(4, 2), (9, 3), (4, 4), (16, 1)]),  # (query heads, kv heads)
    head_dim=st.sampled_from([16, 48, 64, 256]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_decode_attention_matches_reference(lens, heads, head_dim, dtype, seed):
    num_heads, num_kv_heads = heads
    assert cpu_kernel.attention_is_available(dtype, CPU, num_heads, num_kv_heads, head_dim)
    gen = torch.Generator().manual_seed(seed)
    kv, rows = random_cache(gen, lens, num_kv_heads, head_dim, dtype)
    # q as the model has it: a view of q and k side by side, [num_seqs, heads, dim].
    q = torch.randn(len(lens), num_heads + num_kv_heads, head_dim, generator=gen).to(dtype)
    q = q[:, :num_heads]
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    lens_t = torch.tensor(lens)
    cpu_kernel.decode_attention(out, q, kv, rows, lens_t, head_dim**-0.5)
    want = attention_reference(q, kv, rows, lens_t)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]  # bf16: the output's rounding
    torch.testing.assert_close(out.double(), want, rtol=tolerance, atol=tolerance)


@needs_compiler
def test_decode_attention_refuses_bad_rows_lengths_and_shapes_without_writing():
    gen = torch.Generator().manual_seed(0)
    kv, rows = random_cache(gen, [5, 9], 2, 16, torch.float32)
    q = torch.randn(2, 4, 16, generator=gen)
    out = torch.zeros(2, 4, 16)

    def attend(rows=rows, lens=(5, 9), kv=kv, q=q, out=out):
        cpu_kernel.decode_attention(out, q, kv, rows, torch.tensor(lens), 0.25)

    outside = rows.clone()
    outside[1, 8] = kv.shape[1]  # one past the last cache row
    negative = rows.clone()
    negative[0, 0] = -1
    for bad in (dict(rows=outside), dict(rows=negative), dict(lens=(0, 9)),
                dict(lens=(5, rows.shape[1] + 1))):
        with pytest.raises(cpu_kernel.KernelError, match="out of range"):
            attend(**bad)
    assert not out.any()
    with pytest.raises(cpu_kernel.KernelError, match="not built for"):  # head_dim 24
        attend(kv=torch.zeros(2, kv.shape[1], 2, 24), q=torch.zeros(2, 4, 24),
               out=torch.zeros(2, 4, 24))
    assert not cpu_kernel.attention_is_available(torch.float32, CPU, 4, 2, 24)
    assert not cpu_kernel.attention_is_available(torch.float32, CPU, 5, 2, 16)  # 5 / 2 heads
    with pytest.raises(cpu_kernel.KernelError, match="layout"):  # the cache as a view
        attend(kv=kv.transpose(2, 3))
    with pytest.raises(cpu_kernel.KernelError, match="dtype"):
        attend(out=out.bfloat16())
    assert not out.any()
    attend()  # the same call, well formed
    assert out.all()


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


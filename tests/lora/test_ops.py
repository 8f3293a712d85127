"""The mixed-adapter op against its one-token-at-a-time reference, on random mixes."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex.lora.ops import NO_ADAPTER, AdapterBatch, add_lora, add_lora_reference
from loraplex.lora.quantize import quantize


@settings(max_examples=60, deadline=None)
@given(
    # (slot, run length): single tokens (decodes) and long runs (prefill chunks) mixed.
    runs=st.lists(st.tuples(st.integers(min_value=NO_ADAPTER, max_value=11), st.integers(1, 20)),
                  min_size=1, max_size=10),
    seed=st.integers(0, 2**16),
    out_sizes=st.sampled_from([(10,), (10, 6, 6), (7, 7)]),  # one module, fused q/k/v, gate/up
    int8=st.booleans(),  # weights as int8 with scales (lora_dtype="int8")
)
def test_add_lora_matches_reference(runs, seed, out_sizes, int8):
    token_slots = [slot for slot, length in runs for _ in range(length)]
    gen = torch.Generator().manual_seed(seed)
    num_slots, rank, d_in, d_out = 12, 8, 12, sum(out_sizes)
    x = torch.randn(len(token_slots), d_in, generator=gen, dtype=torch.float64)
    y = torch.randn(len(token_slots), d_out, generator=gen, dtype=torch.float64)
    lora_a = torch.randn(num_slots, len(out_sizes) * rank, d_in, generator=gen,
                         dtype=torch.float64)
    lora_b = tuple(torch.randn(num_slots, rank, out, generator=gen, dtype=torch.float64)
                   for out in out_sizes)
    scales = None
    if int8:
        parts = [quantize(lora_a[:, i * rank:(i + 1) * rank], b) for i, b in enumerate(lora_b)]
        lora_a, lora_b = torch.cat([p[0] for p in parts], dim=1), tuple(p[1] for p in parts)
        scales = torch.cat([p[2] for p in parts], dim=1)
    want = add_lora_reference(y, x, lora_a, lora_b, torch.tensor(token_slots), scales)
    batch = AdapterBatch.build(token_slots, torch.device("cpu"))
    if batch is None:  # no token has an adapter: the layer output is the base output
        assert all(s == NO_ADAPTER for s in token_slots)
        return
    got = add_lora(y.clone(), x, lora_a, lora_b, batch, scales)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_prefill_runs_take_plain_matmuls_and_decodes_one_piece_per_slot():
    # One 256-token prefill on slot 0 after 31 single-token decodes on slots 1..31.
    token_slots = list(range(1, 32)) + [0] * 256
    batch = AdapterBatch.build(token_slots, torch.device("cpu"))
    assert batch.runs == ((0, 31, 287),)
    assert batch.piece_tokens.shape == (32, 1)  # slot 0's piece is padding only
    assert batch.valid_tokens.tolist() == list(range(31))
    # Short runs (under MIN_RUN_TOKENS) stay in the pieces, padded to the longest.
    batch = AdapterBatch.build([2, 2, 2, 0, NO_ADAPTER, 1], torch.device("cpu"))
    assert batch.runs == () and batch.piece_tokens.shape == (3, 3)
    assert batch.piece_slots is None  # slots 0..2 in place
    assert sorted(batch.valid_tokens.tolist()) == [0, 1, 2, 3, 5]
    # Two high slots in use: their matrices are gathered, not 31 slots read in place.
    batch = AdapterBatch.build([30, 2], torch.device("cpu"))
    assert batch.piece_slots.tolist() == [2, 30] and batch.piece_tokens.tolist() == [[1], [0]]
    assert not batch.pieces_are_tokens
    # One decode per slot, ordered by slot, then the rest: token i is piece i, in place.
    batch = AdapterBatch.build([0, 1, 2, NO_ADAPTER] + [1] * 9, torch.device("cpu"))
    assert batch.pieces_are_tokens and batch.runs == ((1, 4, 13),)
    assert not AdapterBatch.build([1, 0, 2], torch.device("cpu")).pieces_are_tokens

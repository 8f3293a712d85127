"""The mixed-adapter op against its one-token-at-a-time reference, on random mixes of slots and
ranks."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex.lora.ops import NO_ADAPTER, AdapterBatch, add_lora, add_lora_reference
from tests.lora.paged import paged_layer

CPU = torch.device("cpu")


@settings(max_examples=60, deadline=None)
@given(
    # (slot, run length): single tokens (decodes) and long runs (prefill chunks) mixed.
    runs=st.lists(st.tuples(st.integers(min_value=NO_ADAPTER, max_value=11), st.integers(1, 20)),
                  min_size=1, max_size=10),
    ranks=st.lists(st.sampled_from([0, 1, 3, 8, 16]), min_size=12, max_size=12),  # 0: empty
    seed=st.integers(0, 2**16),
    out_sizes=st.sampled_from([(10,), (10, 6, 6), (7, 7)]),  # one module, fused q/k/v, gate/up
    int8=st.booleans(),  # weights as int8 with scales (lora_dtype="int8")
)
def test_add_lora_matches_reference(runs, ranks, seed, out_sizes, int8):
    token_slots = [slot for slot, length in runs for _ in range(length)]
    gen = torch.Generator().manual_seed(seed)
    places, lora_a, lora_b, scales = paged_layer(gen, ranks, out_sizes, 12, int8=int8)
    x = torch.randn(len(token_slots), 12, generator=gen, dtype=torch.float64)
    y = torch.randn(len(token_slots), sum(out_sizes), generator=gen, dtype=torch.float64)
    want = add_lora_reference(y, x, lora_a, lora_b, torch.tensor(token_slots), places, scales)
    assert not want.isnan().any()  # no row outside a slot's own was read
    batch = AdapterBatch.build(token_slots, places, CPU)
    if batch is None:  # no token has an adapter: the layer output is the base output
        assert all(s == NO_ADAPTER or ranks[s] == 0 for s in token_slots)
        return
    got = add_lora(y.clone(), x, lora_a, lora_b, batch, scales)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_prefill_runs_take_plain_matmuls_and_decodes_go_in_pieces_by_rank():
    places = [(0, 8)] + [(8 + 16 * (s - 1), 16) for s in range(1, 32)]
    # One 256-token prefill on slot 0 after 31 single-token decodes on slots 1..31.
    token_slots = list(range(1, 32)) + [0] * 256
    batch = AdapterBatch.build(token_slots, places, CPU)
    assert batch.runs == ((0, 31, 287),)
    [pieces] = batch.pieces
    assert pieces.rank == 16 and pieces.tokens.shape == (31, 1)
    assert pieces.valid_tokens.tolist() == list(range(31))
    assert pieces.b_rows[0].tolist() == list(range(8, 24))  # slot 1's own rows
    assert pieces.a_rows[3][0].tolist() == list(range(24, 72))  # q/k/v: 3 rows a B row
    # Short runs (under MIN_RUN_TOKENS) stay in the pieces, one group per rank, each padded to
    # its longest; an empty slot (rank 0) adds nothing.
    places = [(0, 8), (8, 16), (24, 8), (0, 0)]
    batch = AdapterBatch.build([2, 2, 2, 0, NO_ADAPTER, 1, 3], places, CPU)
    assert batch.runs == () and [p.rank for p in batch.pieces] == [8, 16]
    assert batch.pieces[0].tokens.shape == (2, 3)  # slots 0 and 2
    assert sorted(batch.pieces[0].valid_tokens.tolist()) == [0, 1, 2, 3]
    assert batch.pieces[1].valid_tokens.tolist() == [5]
    assert AdapterBatch.build([3, NO_ADAPTER], places, CPU) is None

"""The mixed-adapter op against its one-token-at-a-time reference, on random mixes."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex.lora.ops import NO_ADAPTER, AdapterBatch, add_lora, add_lora_reference


@settings(max_examples=60, deadline=None)
@given(
    token_slots=st.lists(st.integers(min_value=NO_ADAPTER, max_value=3), min_size=1, max_size=40),
    seed=st.integers(0, 2**16),
)
def test_add_lora_matches_reference(token_slots, seed):
    gen = torch.Generator().manual_seed(seed)
    num_slots, rank, d_in, d_out = 4, 8, 12, 10
    x = torch.randn(len(token_slots), d_in, generator=gen, dtype=torch.float64)
    y = torch.randn(len(token_slots), d_out, generator=gen, dtype=torch.float64)
    lora_a = torch.randn(num_slots, rank, d_in, generator=gen, dtype=torch.float64)
    lora_b = torch.randn(num_slots, d_out, rank, generator=gen, dtype=torch.float64)
    want = add_lora_reference(y, x, lora_a, lora_b, torch.tensor(token_slots))
    batch = AdapterBatch.build(token_slots, torch.device("cpu"))
    if batch is None:  # no token has an adapter: the layer output is the base output
        assert all(s == NO_ADAPTER for s in token_slots)
        return
    got = add_lora(y.clone(), x, lora_a, lora_b, batch)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_pieces_bound_padding_for_a_long_prefill_among_decodes():
    # One 256-token prefill on slot 0 next to 31 single-token decodes on other slots.
    token_slots = [0] * 256 + list(range(1, 32))
    batch = AdapterBatch.build(token_slots, torch.device("cpu"))
    padded = batch.piece_tokens.numel()
    assert padded <= 2 * len(token_slots) + 32  # not 32 groups x 256
    assert sorted(batch.valid_tokens.tolist()) == list(range(len(token_slots)))

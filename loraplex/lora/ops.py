"""The mixed-adapter LoRA op: every token of a batch may use a different adapter slot.

The adapters live in stacked slot buffers, one pair per base linear layer:
    lora_a  [max_loras, max_rank, in_features]
    lora_b  [max_loras, out_features, max_rank]   (already multiplied by the adapter's scaling)
A smaller rank is zero-padded up to max_rank, so padding adds nothing to the result.

Per step, the engine describes which slot each token uses with one `AdapterBatch`, built once and
shared by every layer. `add_lora` groups the tokens by slot into equal-length "pieces" so that the
whole step is two batched matmuls per layer (Punica's SGMV idea, in plain PyTorch).
"""

from dataclasses import dataclass

import torch

NO_ADAPTER = -1


@dataclass(frozen=True)
class AdapterBatch:
    """Per-step adapter metadata: which slot each token reads, grouped for batched matmuls.

    Tokens with an adapter are split into pieces: runs of at most `piece_len` tokens that use the
    same slot. Short pieces are padded with token 0; padded positions are dropped on scatter.
    When the groups are balanced (decode steps), piece i is simply slot i (`piece_slots` is
    None), so the matmuls read the slot buffers in place instead of gathering a copy of every
    active adapter's weights each layer.
    """

    token_slots: torch.Tensor  # [num_tokens] int64, slot of each token or NO_ADAPTER
    piece_slots: torch.Tensor | None  # [num_pieces] int64 slot per piece; None: piece i = slot i
    piece_tokens: torch.Tensor  # [num_pieces, piece_len] int64, token index (0 where padded)
    valid_positions: torch.Tensor  # [num_lora_tokens] int64, flat index into num_pieces * piece_len
    valid_tokens: torch.Tensor  # [num_lora_tokens] int64, the token at each valid position

    @classmethod
    def build(cls, token_slots: list[int], device: torch.device) -> "AdapterBatch | None":
        """Group the tokens by slot; None when no token has an adapter (the base-only path)."""
        by_slot: dict[int, list[int]] = {}
        for token, slot in enumerate(token_slots):
            if slot != NO_ADAPTER:
                by_slot.setdefault(slot, []).append(token)
        if not by_slot:
            return None
        num_lora_tokens = sum(len(tokens) for tokens in by_slot.values())
        longest = max(len(tokens) for tokens in by_slot.values())
        dense = longest * (max(by_slot) + 1) <= 2 * num_lora_tokens
        if dense:  # one piece per slot 0..max slot, padding at most doubles the work
            piece_len = longest
            groups = [(slot, by_slot.get(slot, [])) for slot in range(max(by_slot) + 1)]
        else:
            # A piece length near the mean group size keeps padding under ~2x in every mix: one
            # 256-token prefill next to 31 decodes is split into several pieces instead of
            # padding all 32 groups to 256.
            piece_len = 1 << max(0, (num_lora_tokens // len(by_slot) - 1).bit_length())
            groups = [(slot, tokens[start : start + piece_len])
                      for slot, tokens in by_slot.items()
                      for start in range(0, len(tokens), piece_len)]
        piece_slots, piece_tokens, valid_positions, valid_tokens = [], [], [], []
        for slot, chunk in groups:
            base = len(piece_slots) * piece_len
            valid_positions.extend(range(base, base + len(chunk)))
            valid_tokens.extend(chunk)
            piece_slots.append(slot)
            piece_tokens.append(chunk + [0] * (piece_len - len(chunk)))

        def as_tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return cls(
            token_slots=as_tensor(token_slots),
            piece_slots=None if dense else as_tensor(piece_slots),
            piece_tokens=as_tensor(piece_tokens),
            valid_positions=as_tensor(valid_positions),
            valid_tokens=as_tensor(valid_tokens),
        )


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    batch: AdapterBatch,
) -> torch.Tensor:
    """Add each token's LoRA delta to the base layer's output, in place, and return y.

    Semantics:
        for t in range(num_tokens):
            s = batch.token_slots[t]
            if s != NO_ADAPTER:
                y[t] += lora_b[s] @ (lora_a[s] @ x[t])

    Shapes: x [num_tokens, in], y [num_tokens, out], lora_a [max_loras, r, in],
    lora_b [max_loras, out, r].
    """
    num_pieces = batch.piece_tokens.shape[0]
    if batch.piece_slots is None:  # piece i is slot i: views of the slot buffers, no copy
        a, b = lora_a[:num_pieces], lora_b[:num_pieces]
    else:
        a, b = lora_a[batch.piece_slots], lora_b[batch.piece_slots]
    xs = x[batch.piece_tokens]  # [num_pieces, piece_len, in]
    shrunk = torch.bmm(xs, a.transpose(1, 2))  # [num_pieces, piece_len, r]
    delta = torch.bmm(shrunk, b.transpose(1, 2))  # [num_pieces, piece_len, out]
    delta = delta.reshape(-1, y.shape[-1])[batch.valid_positions]  # [num_lora_tokens, out]
    return y.index_add_(0, batch.valid_tokens, delta)


def add_lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: torch.Tensor,
) -> torch.Tensor:
    """The Semantics block of `add_lora`, one token at a time: the reference tests compare with."""
    y = y.clone()
    for t, slot in enumerate(token_slots.tolist()):
        if slot != NO_ADAPTER:
            y[t] += lora_b[slot] @ (lora_a[slot] @ x[t])
    return y

"""The mixed-adapter LoRA op: every token of a batch may use a different adapter slot.

The adapters live in stacked slot buffers per base linear layer. A fused linear (q/k/v or
gate/up) holds n modules that read the same input, so their A matrices are stacked and shrink the
input in one matmul; each module keeps its own B, stored transposed (rows of outputs):
    lora_a  [max_loras, n * max_rank, in_features]
    lora_b  n x [max_loras, max_rank, out_i]   (already multiplied by the adapter's scaling)
A smaller rank is zero-padded up to max_rank, so padding adds nothing to the result. With int8
adapter weights (lora/quantize.py) A and B are int8 and each row of A has a scale:
    lora_scales [max_loras, n * max_rank] float32, applied to the shrink's result

Per step, the engine describes which slot each token uses with one `AdapterBatch`, built once and
shared by every layer. No layer ever copies adapter weights:
- on CPU (float32, bfloat16) the whole op is our own loop over same-slot stretches of tokens
  (kernels/lora.cpp): a decoding token reads its slot's matrices once, near memory speed,
  and a prefill chunk's tokens share each weight load, without PyTorch's per-matmul cost;
- elsewhere (CUDA, no compiler), long runs (a prefill chunk on one slot) are plain matmuls
  against that slot's matrices (views of the buffers), and the short rest (one token per
  decoding sequence) is grouped by slot into equal-length pieces, piece i being slot i, so that
  it is two batched matmuls per layer over the slot buffers in place (Punica's SGMV idea, in
  plain PyTorch); only when few, high slots are in use are their matrices gathered instead.
"""

from dataclasses import dataclass

import torch

from loraplex.kernels import cpu as cpu_kernel

NO_ADAPTER = -1
# A run of at least this many tokens on one slot is computed on its own with plain matmuls;
# shorter ones join the batched pieces (one more matmul pair per run costs more than padding).
MIN_RUN_TOKENS = 8


@dataclass(frozen=True)
class AdapterBatch:
    """Per-step adapter metadata: the CPU kernel's segments, or which tokens take the run path
    and which the piece path.

    Pieces hold the short-run tokens of one slot each, padded with token 0 to `piece_len`;
    padded positions are dropped on scatter. Usually piece i is slot i (`piece_slots` None) and
    the matmuls read the slot buffers in place, a slot without such tokens being an all-padding
    piece. When few high slots are in use, reading every slot up to the highest would cost more
    than copying the used ones, so the pieces are just those slots (`piece_slots`).
    """

    runs: tuple[tuple[int, int, int], ...]  # (slot, first token, end token) of each long run
    # With the CPU kernel, every token with an adapter, as (slot, start, end) of each maximal
    # same-slot stretch [num_segments, 3] int64; runs and pieces are then empty.
    kernel_segments: torch.Tensor | None
    piece_slots: torch.Tensor | None  # [num_pieces] slot of each piece; None: piece i = slot i
    piece_tokens: torch.Tensor | None  # [num_pieces, piece_len] int64, token (0 where padded)
    # Piece i is exactly token i (one decoding sequence per slot, ordered by slot, as the model
    # runner orders them): no gather of the inputs, no scatter of the deltas.
    pieces_are_tokens: bool
    valid_positions: torch.Tensor | None  # [num_piece_tokens] flat index into the pieces
    valid_tokens: torch.Tensor | None  # [num_piece_tokens] the token at each valid position

    @classmethod
    def build(cls, token_slots: list[int], device: torch.device,
              use_kernel: bool = False) -> "AdapterBatch | None":
        """Describe the tokens as the CPU kernel's segments (`use_kernel`, see
        cpu_kernel.is_available), or as long runs and pieces; None when no token has an adapter
        (the base-only path)."""
        stretches = list(_stretches(token_slots))
        if not stretches:
            return None

        def as_tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        if use_kernel:
            return cls((), as_tensor(stretches), None, None, False, None, None)
        runs, by_slot = [], {}
        for slot, start, end in stretches:
            if end - start >= MIN_RUN_TOKENS:
                runs.append((slot, start, end))
            else:
                by_slot.setdefault(slot, []).extend(range(start, end))
        piece_slots = piece_tokens = valid_positions = valid_tokens = None
        pieces_are_tokens = False
        if by_slot:
            piece_len = max(len(tokens) for tokens in by_slot.values())
            # In place, the matmuls read max+1 slots; a copy of the used ones is read, written
            # and read again: 3 slots' worth of memory traffic per used slot.
            in_place = max(by_slot) + 1 <= 3 * len(by_slot)
            order = range(max(by_slot) + 1) if in_place else sorted(by_slot)
            pieces, positions, tokens = [], [], []
            for i, slot in enumerate(order):
                chunk = by_slot.get(slot, [])
                positions.extend(range(i * piece_len, i * piece_len + len(chunk)))
                tokens.extend(chunk)
                pieces.append(chunk + [0] * (piece_len - len(chunk)))
            piece_slots = None if in_place else as_tensor(list(order))
            piece_tokens, valid_positions = as_tensor(pieces), as_tensor(positions)
            valid_tokens = as_tensor(tokens)
            pieces_are_tokens = piece_len == 1 and tokens == list(range(len(order)))
        return cls(tuple(runs), None, piece_slots, piece_tokens, pieces_are_tokens,
                   valid_positions, valid_tokens)


def _stretches(token_slots: list[int]):
    """(slot, start, end) of each maximal stretch of consecutive tokens on one adapter slot."""
    start = 0
    for end in range(1, len(token_slots) + 1):
        if end < len(token_slots) and token_slots[end] == token_slots[start]:
            continue
        if token_slots[start] != NO_ADAPTER:
            yield token_slots[start], start, end
        start = end


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: tuple[torch.Tensor, ...],
    batch: AdapterBatch,
    lora_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add each token's LoRA delta to the base layer's output, in place, and return y.

    Semantics (s = the slot of token t as given to AdapterBatch.build, r = max_rank, module i's
    output columns follow module i-1's; with int8 weights, h is multiplied by lora_scales[s]):
        for t in range(num_tokens):
            if s != NO_ADAPTER:
                h = lora_a[s] @ x[t]
                y[t] += cat([h[i*r:(i+1)*r] @ lora_b[i][s] for i in modules])

    Shapes: x [num_tokens, in], y [num_tokens, sum out_i], lora_a [max_loras, n * r, in],
    lora_b n x [max_loras, r, out_i], lora_scales [max_loras, n * r].
    """
    r = lora_a.shape[1] // len(lora_b)
    outs = [b.shape[2] for b in lora_b]

    def weights(t: torch.Tensor) -> torch.Tensor:  # int8 weights in the inputs' dtype
        return t if lora_scales is None else t.to(x.dtype)

    for slot, start, end in batch.runs:
        shrunk = x[start:end] @ weights(lora_a[slot]).T  # [run_len, n * r]
        if lora_scales is not None:
            shrunk *= lora_scales[slot].to(x.dtype)
        column = 0
        for i, b in enumerate(lora_b):
            y[start:end, column:column + outs[i]].addmm_(shrunk[:, i * r:(i + 1) * r],
                                                         weights(b[slot]))
            column += outs[i]
    if batch.kernel_segments is not None:
        cpu_kernel.add_lora_segments(y, x, lora_a, lora_b, batch.kernel_segments, lora_scales)
    if batch.piece_tokens is not None:
        num_pieces = batch.piece_tokens.shape[0]
        if batch.piece_slots is None:  # views of the slot buffers, no copy
            pieces = slice(num_pieces)
        else:
            pieces = batch.piece_slots
        a, bs = weights(lora_a[pieces]), [weights(b[pieces]) for b in lora_b]
        if batch.pieces_are_tokens:
            xs = x[:num_pieces, None]  # [num_pieces, 1, in], a view
        else:
            xs = x[batch.piece_tokens]  # [num_pieces, piece_len, in]
        shrunk = torch.bmm(xs, a.transpose(1, 2))  # [num_pieces, piece_len, n * r]
        if lora_scales is not None:
            shrunk *= lora_scales[pieces, None].to(x.dtype)
        deltas = [torch.bmm(shrunk[..., i * r:(i + 1) * r], b)
                  for i, b in enumerate(bs)]  # [num_pieces, piece_len, out_i]
        delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1)
        if batch.pieces_are_tokens:
            y[:num_pieces] += delta.view(num_pieces, -1)
        else:
            delta = delta.reshape(-1, y.shape[-1])[batch.valid_positions]  # [piece tokens, out]
            y.index_add_(0, batch.valid_tokens, delta)
    return y


def add_lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: tuple[torch.Tensor, ...],
    token_slots: torch.Tensor,
    lora_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Semantics block of `add_lora`, one token at a time: the reference tests compare with
    (int8 weights are taken in y's dtype)."""
    y = y.clone()
    r = lora_a.shape[1] // len(lora_b)
    for t, slot in enumerate(token_slots.tolist()):
        if slot != NO_ADAPTER:
            h = lora_a[slot].to(y.dtype) @ x[t]
            if lora_scales is not None:
                h = h * lora_scales[slot].to(y.dtype)
            y[t] += torch.cat([h[i * r:(i + 1) * r] @ b[slot].to(y.dtype)
                               for i, b in enumerate(lora_b)])
    return y

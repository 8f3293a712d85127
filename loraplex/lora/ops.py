"""The mixed-adapter LoRA op: every token of a batch may use a different adapter slot, and every
slot has its own rank.

The adapters live in page-pooled buffers per base linear layer (lora/slots.py): rows of A and
rows of B, each adapter's in one contiguous stretch. A fused linear (q/k/v or gate/up) holds n
modules that read the same input, so their A rows are stacked and shrink the input in one
matmul; each module keeps its own B, stored transposed (rows of outputs). With R rows in all:
    lora_a  [n * R, in_features]
    lora_b  n x [R, out_i]   (already multiplied by the adapter's scaling)
A slot holding an adapter of rank r at row o (`places[slot]` = (o, r)) owns B rows [o, o + r)
and A rows [n * o, n * o + n * r), module i's at n * o + i * r. A module below the slot's rank
(rank_pattern) or not targeted holds zero rows, which add nothing. With int8 adapter weights
(lora/quantize.py) A and B are int8 and each row of A has a scale:
    lora_scales [n * R] float32, applied to the shrink's result

Per step, the engine describes which slot each token uses with one `AdapterBatch`, built once and
shared by every layer. Each token reads only its own adapter's r rows, never a padding to the
largest rank in the batch, and no layer copies adapter weights on the CPU:
- on CPU (float32, bfloat16) the whole op is our own loop over same-slot stretches of tokens
  (kernels/lora.cpp): a decoding token reads its slot's matrices once, near memory speed,
  and a prefill chunk's tokens share each weight load, without PyTorch's per-matmul cost;
- elsewhere (CUDA, no compiler), long runs (a prefill chunk on one slot) are plain matmuls
  against that slot's rows (views of the buffers), and the short rest (one token per decoding
  sequence) is grouped by rank, then by slot into equal-length pieces, so that each rank is
  two batched matmuls per layer over its slots' rows, gathered (Punica's SGMV idea, in plain
  PyTorch).
"""

from dataclasses import dataclass

import torch

from loraplex.kernels import cpu as cpu_kernel

NO_ADAPTER = -1
# A run of at least this many tokens on one slot is computed on its own with plain matmuls;
# shorter ones join the batched pieces (one more matmul pair per run costs more than padding).
MIN_RUN_TOKENS = 8
MAX_MODULES = 3  # modules of one fused linear (lora/modules.py FUSED_LINEARS)


@dataclass(frozen=True)
class RankPieces:
    """The short-run tokens of the slots of one rank: piece i holds slot i's tokens, padded with
    token 0 to piece_len; padded positions are dropped on scatter."""

    rank: int
    # n (modules of the layer) -> [num_pieces, n * rank] int64, the A rows of each piece's slot
    a_rows: dict[int, torch.Tensor]
    b_rows: torch.Tensor  # [num_pieces, rank] int64, the B rows of each piece's slot
    tokens: torch.Tensor  # [num_pieces, piece_len] int64, token (0 where padded)
    valid_positions: torch.Tensor  # [num_piece_tokens] flat index into the pieces
    valid_tokens: torch.Tensor  # [num_piece_tokens] the token at each valid position


@dataclass(frozen=True)
class AdapterBatch:
    """Per-step adapter metadata: where each slot's rows are, and the tokens either as the CPU
    kernel's segments or as long runs plus pieces by rank (the PyTorch path)."""

    places: tuple[tuple[int, int], ...]  # slot -> (first B row, rank), as AdapterSlots.places
    # With the CPU kernel, every token with an adapter, as (slot, start, end) of each maximal
    # same-slot stretch [num_segments, 3] int64, and places as [num_slots, 2] int64; runs and
    # pieces are then empty.
    kernel_segments: torch.Tensor | None
    kernel_places: torch.Tensor | None
    runs: tuple[tuple[int, int, int], ...]  # (slot, first token, end token) of each long run
    pieces: tuple[RankPieces, ...]  # one per rank among the short runs' slots

    @classmethod
    def build(cls, token_slots: list[int], places: list[tuple[int, int]],
              device: torch.device, use_kernel: bool = False) -> "AdapterBatch | None":
        """Describe the tokens as the CPU kernel's segments (`use_kernel`, see
        cpu_kernel.is_available), or as long runs and pieces; None when no token has an adapter
        (the base-only path). A slot of rank 0 (empty) adds nothing, so its tokens are left
        out."""
        stretches = [s for s in _stretches(token_slots) if places[s[0]][1] > 0]
        if not stretches:
            return None
        places = tuple(places)

        def as_tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        if use_kernel:
            return cls(places, as_tensor(stretches), as_tensor(list(places)), (), ())
        runs, by_slot = [], {}
        for slot, start, end in stretches:
            if end - start >= MIN_RUN_TOKENS:
                runs.append((slot, start, end))
            else:
                by_slot.setdefault(slot, []).extend(range(start, end))
        by_rank = {}
        for slot in sorted(by_slot):
            by_rank.setdefault(places[slot][1], []).append(slot)
        pieces = tuple(_rank_pieces(rank, slots, by_slot, places, as_tensor)
                       for rank, slots in sorted(by_rank.items()))
        return cls(places, None, None, tuple(runs), pieces)


def _rank_pieces(rank: int, slots: list[int], by_slot: dict[int, list[int]],
                 places: tuple[tuple[int, int], ...], as_tensor) -> RankPieces:
    piece_len = max(len(by_slot[slot]) for slot in slots)
    pieces, positions, tokens = [], [], []
    for i, slot in enumerate(slots):
        chunk = by_slot[slot]
        positions.extend(range(i * piece_len, i * piece_len + len(chunk)))
        tokens.extend(chunk)
        pieces.append(chunk + [0] * (piece_len - len(chunk)))
    rows = [places[slot][0] for slot in slots]
    a_rows = {n: as_tensor([list(range(n * row, n * row + n * rank)) for row in rows])
              for n in range(1, MAX_MODULES + 1)}
    b_rows = as_tensor([list(range(row, row + rank)) for row in rows])
    return RankPieces(rank, a_rows, b_rows, as_tensor(pieces), as_tensor(positions),
                      as_tensor(tokens))


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
    kernel: cpu_kernel.LoraKernel | None = None,
) -> torch.Tensor:
    """Add each token's LoRA delta to the base layer's output, in place, and return y;
    `kernel`: the CPU kernel already bound to these buffers (a layer's, kernels/cpu.py).

    Semantics (s = the slot of token t as given to AdapterBatch.build, (o, r) = places[s], n =
    len(lora_b), module i's output columns follow module i-1's; with int8 weights, h is
    multiplied by lora_scales[n*o : n*o + n*r]):
        for t in range(num_tokens):
            if s != NO_ADAPTER and r > 0:
                h = lora_a[n*o : n*o + n*r] @ x[t]
                y[t] += cat([h[i*r:(i+1)*r] @ lora_b[i][o:o+r] for i in modules])

    Shapes: x [num_tokens, in], y [num_tokens, sum out_i], lora_a [n * R, in], lora_b n x [R,
    out_i], lora_scales [n * R].
    """
    if batch.kernel_segments is not None:  # then runs and pieces are empty (build)
        kernel = kernel or cpu_kernel.LoraKernel(lora_a, lora_b, lora_scales)
        kernel(y, x, batch.kernel_segments, batch.kernel_places)
        return y
    n = len(lora_b)
    outs = [b.shape[1] for b in lora_b]

    def weights(t: torch.Tensor) -> torch.Tensor:  # int8 weights in the inputs' dtype
        return t if lora_scales is None else t.to(x.dtype)

    for slot, start, end in batch.runs:
        row, r = batch.places[slot]
        a_rows = slice(n * row, n * row + n * r)
        shrunk = x[start:end] @ weights(lora_a[a_rows]).T  # [run_len, n * r]
        if lora_scales is not None:
            shrunk *= lora_scales[a_rows].to(x.dtype)
        column = 0
        for i, b in enumerate(lora_b):
            y[start:end, column:column + outs[i]].addmm_(shrunk[:, i * r:(i + 1) * r],
                                                         weights(b[row:row + r]))
            column += outs[i]
    for pieces in batch.pieces:
        _add_pieces(y, x, lora_a, lora_b, pieces, lora_scales)
    return y


def _add_pieces(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                lora_b: tuple[torch.Tensor, ...], pieces: RankPieces,
                lora_scales: torch.Tensor | None) -> None:
    """add_lora for the pieces of one rank: two batched matmuls over their slots' rows."""
    n, r = len(lora_b), pieces.rank
    a_rows = pieces.a_rows[n]
    a = lora_a[a_rows]  # [num_pieces, n * r, in], a gather of exactly the rows in use
    bs = [b[pieces.b_rows] for b in lora_b]  # [num_pieces, r, out_i]
    if lora_scales is not None:
        a, bs = a.to(x.dtype), [b.to(x.dtype) for b in bs]
    xs = x[pieces.tokens]  # [num_pieces, piece_len, in]
    shrunk = torch.bmm(xs, a.transpose(1, 2))  # [num_pieces, piece_len, n * r]
    if lora_scales is not None:
        shrunk *= lora_scales[a_rows][:, None].to(x.dtype)
    deltas = [torch.bmm(shrunk[..., i * r:(i + 1) * r], b)
              for i, b in enumerate(bs)]  # [num_pieces, piece_len, out_i]
    delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1)
    delta = delta.reshape(-1, y.shape[-1])[pieces.valid_positions]  # [piece tokens, out]
    y.index_add_(0, pieces.valid_tokens, delta)


def add_lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: tuple[torch.Tensor, ...],
    token_slots: torch.Tensor,
    places: list[tuple[int, int]],
    lora_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Semantics block of `add_lora`, one token at a time: the reference tests compare with
    (int8 weights are taken in y's dtype)."""
    y = y.clone()
    n = len(lora_b)
    for t, slot in enumerate(token_slots.tolist()):
        if slot == NO_ADAPTER:
            continue
        o, r = places[slot]
        if r == 0:
            continue
        h = lora_a[n * o:n * o + n * r].to(y.dtype) @ x[t]
        if lora_scales is not None:
            h = h * lora_scales[n * o:n * o + n * r].to(y.dtype)
        y[t] += torch.cat([h[i * r:(i + 1) * r] @ b[o:o + r].to(y.dtype)
                           for i, b in enumerate(lora_b)])
    return y

"""Random page-pooled LoRA layers for the op and kernel tests: slots of mixed ranks at scattered
rows, every row no slot owns holding NaN, so a read outside a slot's own rows shows."""

import torch

from loraplex.lora.quantize import quantize


def scatter_places(gen: torch.Generator, ranks: list[int]) -> tuple[list[tuple[int, int]], int]:
    """(places, num_rows): slot s of rank ranks[s] (0: empty) at a row of its own, the slots in
    a random order with random gaps between them."""
    order = torch.randperm(len(ranks), generator=gen).tolist()
    places, row = [(0, 0)] * len(ranks), 0
    for slot in order:
        row += int(torch.randint(0, 3, (1,), generator=gen))  # a gap, often
        if ranks[slot]:
            places[slot] = (row, ranks[slot])
            row += ranks[slot]
    return places, row + 1


def paged_layer(gen, ranks, out_sizes, d_in, dtype=torch.float64, int8=False):
    """(places, lora_a [n * R, in], lora_b n x [R, out_i], scales [n * R] or None) with slot s
    of rank ranks[s], scaled so that shrink and delta are of size ~1, as in a model."""
    places, num_rows = scatter_places(gen, ranks)
    n = len(out_sizes)
    a = torch.full((n * num_rows, d_in), float("nan"), dtype=torch.float64)
    bs = [torch.full((num_rows, out), float("nan"), dtype=torch.float64) for out in out_sizes]
    scales = torch.full((n * num_rows,), float("nan"), dtype=torch.float32) if int8 else None
    for row, r in places:
        if not r:
            continue
        slot_a = torch.randn(n * r, d_in, generator=gen, dtype=torch.float64) * d_in ** -0.5
        slot_bs = [torch.randn(r, out, generator=gen, dtype=torch.float64) * r ** -0.5
                   for out in out_sizes]
        if int8:
            parts = [quantize(slot_a[i * r:(i + 1) * r], b) for i, b in enumerate(slot_bs)]
            slot_a = torch.cat([p[0] for p in parts]).double()
            slot_bs = [p[1].double() for p in parts]
            scales[n * row:n * (row + r)] = torch.cat([p[2] for p in parts])
        a[n * row:n * (row + r)] = slot_a
        for b, slot_b in zip(bs, slot_bs, strict=True):
            b[row:row + r] = slot_b
    weight_dtype = torch.int8 if int8 else dtype
    if int8:  # int8 has no NaN: rows no slot owns hold the largest value instead
        a, bs = a.nan_to_num(127.0), [b.nan_to_num(127.0) for b in bs]
    return places, a.to(weight_dtype), tuple(b.to(weight_dtype) for b in bs), scales

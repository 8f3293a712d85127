"""The CPU kernels alone, on SmolLM2-135M's shapes: what a step's LoRA work and decode attention
cost, without the rest of the engine.

    python -m loraplex.bench.kernels [--dtype bfloat16] [--lora-dtype auto[,int8]]
                                     [--slots 32] [--repeats 7]

LoRA: random page buffers (lora/slots.py's layout) of 30 layers for the four groups the model
calls (q/k/v, gate/up, o, down) holding `slots` rank-16 adapters one after another, each layer's
buffers its own tensors so that a step reads them from memory as the engine does; times one
decode step (one token per slot) and prefill runs of 8, 64 and 200 tokens on one slot, and
prints the decode step's read rate. Attention: 32
sequences with contexts of 16-300 tokens on scattered blocks of 16, 30 layers. Medians of
`repeats`. With `--lora-dtype int8` the adapter weights are int8 with scales
(lora/quantize.py); with `auto,int8` both, their runs alternating in one process. Used for the
kernel rows of BENCHMARKS.md's "Attempts".
"""

import argparse
import statistics
import time

import torch

from loraplex.bench.cli import positive_int
from loraplex.config import DTYPES, LORA_DTYPES
from loraplex.kernels import cpu as cpu_kernel
from loraplex.lora.quantize import quantize

LAYERS, RANK, HIDDEN, INTERMEDIATE = 30, 16, 576, 1536
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
# (in features, out features of each module) of the model's four LoRA calls per layer
GROUPS = [(HIDDEN, [HIDDEN, 192, 192]), (HIDDEN, [INTERMEDIATE, INTERMEDIATE]),
          (HIDDEN, [HIDDEN]), (INTERMEDIATE, [HIDDEN])]


def median_seconds(fn, repeats: int) -> float:
    return alternating_medians([fn], repeats)[0]


def alternating_medians(fns: list, repeats: int) -> list[float]:
    """Each function's median time over `repeats` rounds, each round running them all in turn
    (so that the machine's drift touches them alike), after one warm-up call each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def lora_dtypes(text: str) -> list[str]:
    """argparse type: a comma list of EngineConfig.lora_dtype values."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or any(name not in LORA_DTYPES for name in names):
        raise argparse.ArgumentTypeError(f"should be a comma list of {', '.join(LORA_DTYPES)}, "
                                         f"got {text!r}")
    return list(dict.fromkeys(names))


def lora_step(layers, segments: list[list[int]], num_tokens: int, dtype, slots: int):
    segments = torch.tensor(segments, dtype=torch.int64)
    # slot s: B rows [s * RANK, (s + 1) * RANK)
    places = torch.tensor([[s * RANK, RANK] for s in range(slots)], dtype=torch.int64)
    inputs = {d: torch.randn(num_tokens, d).to(dtype) for d in (HIDDEN, INTERMEDIATE)}
    outputs = [torch.zeros(num_tokens, sum(outs), dtype=dtype) for _, outs in GROUPS]

    def step():
        for layer in layers:
            for (a, b, scales), y, (d_in, _) in zip(layer, outputs, GROUPS, strict=True):
                cpu_kernel.add_lora_segments(y, inputs[d_in], a, b, segments, places,
                                              scales)
    return step


def random_group(slots: int, d_in: int, outs: list[int], dtype, int8: bool):
    """(A, Bt of each module, scales or None) of one LoRA call's page buffers, `slots` adapters
    of rank RANK one after another: adapter s's A rows of module i are at n * s * RANK + i * RANK
    (n modules), its B rows at s * RANK."""
    n, rows = len(outs), slots * RANK
    a = torch.randn(n * rows, d_in).to(dtype) * 0.05
    bs = tuple(torch.randn(rows, o).to(dtype) * 0.05 for o in outs)
    if not int8:
        return a, bs, None
    a_q, scales, b_q = torch.empty_like(a, dtype=torch.int8), torch.empty(n * rows), []
    for i, b in enumerate(bs):
        a_rows = torch.cat([torch.arange(RANK) + n * s * RANK + i * RANK for s in range(slots)])
        part_a, part_b, part_scales = quantize(a[a_rows], b)
        a_q[a_rows], scales[a_rows] = part_a, part_scales
        b_q.append(part_b)
    return a_q, tuple(b_q), scales


def attention_step(dtype, num_seqs: int = 32):
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(16, 301, (num_seqs,), generator=gen)
    blocks = -(-lens // BLOCK)
    order = torch.randperm(int(blocks.sum()), generator=gen)
    width = int(blocks.max()) * BLOCK
    rows = torch.zeros(num_seqs, width, dtype=torch.int64)
    used = 0
    for b, count in enumerate(blocks.tolist()):
        owned = order[used:used + count]
        used += count
        rows[b, :count * BLOCK] = (owned[:, None] * BLOCK + torch.arange(BLOCK)).flatten()
    caches = [torch.randn(2, int(blocks.sum()) * BLOCK, KV_HEADS, HEAD_DIM).to(dtype)
              for _ in range(LAYERS)]
    q = torch.randn(num_seqs, HEADS, HEAD_DIM).to(dtype)
    out = torch.empty_like(q)

    def step():
        for cache in caches:
            cpu_kernel.decode_attention(out, q, cache, rows, lens, HEAD_DIM**-0.5)
    return step, int(lens.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--lora-dtype", type=lora_dtypes, default=["auto"])
    parser.add_argument("--slots", type=positive_int, default=32)
    parser.add_argument("--repeats", type=positive_int, default=7)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    if not cpu_kernel.is_available(dtype, torch.device("cpu")):
        raise SystemExit("the CPU kernels are not available here (no C++ compiler?)")
    layers, step_bytes = {}, {}
    for lora_dtype in args.lora_dtype:
        int8 = lora_dtype == "int8"
        layers[lora_dtype] = [[random_group(args.slots, d_in, outs, dtype, int8)
                               for d_in, outs in GROUPS] for _ in range(LAYERS)]
        itemsize = 1 if int8 else torch.tensor([], dtype=dtype).element_size()
        step_bytes[lora_dtype] = LAYERS * args.slots * RANK * sum(
            (len(outs) * d_in + sum(outs)) * itemsize + (4 * len(outs) if int8 else 0)
            for d_in, outs in GROUPS)

    def medians(segments: list[list[int]], num_tokens: int) -> dict[str, float]:
        steps = [lora_step(layers[d], segments, num_tokens, dtype, args.slots)
                 for d in args.lora_dtype]
        return dict(zip(args.lora_dtype, alternating_medians(steps, args.repeats), strict=True))

    decode = medians([[s, s, s + 1] for s in range(args.slots)], args.slots)
    runs = {n: medians([[0, 0, n]], n) for n in (8, 64, 200)}
    for lora_dtype in args.lora_dtype:
        weights = "int8 weights" if lora_dtype == "int8" else "weights in the same dtype"
        seconds = decode[lora_dtype]
        print(f"LoRA, {args.dtype}, {weights}, {LAYERS} layers: decode step of {args.slots} "
              f"adapters {1e3 * seconds:.1f} ms ({step_bytes[lora_dtype] / seconds / 1e9:.1f} "
              "GB/s)")
        for n, run in runs.items():
            print(f"LoRA, prefill run of {n} tokens on one slot: {1e3 * run[lora_dtype]:.2f} ms")
    step, context = attention_step(dtype)
    print(f"decode attention, 32 sequences ({context} cached tokens), {LAYERS} layers: "
          f"{1e3 * median_seconds(step, args.repeats):.1f} ms")


if __name__ == "__main__":
    main()

"""Int8 adapter weights (EngineConfig.lora_dtype="int8"): half the bytes of bfloat16.

A decode step reads every in-flight adapter's matrices once (32 rank-16 all-module adapters of
the default model: 312 MB in bfloat16, more than the base weights), so there the LoRA op is
bound by memory traffic and its time follows the bytes. Each row of A (one rank direction's input
weights) and each row of Bt (its output weights) is stored as int8 with its own absmax scale; the
two scales of rank direction k multiply into one, applied to the shrink's sum h[k]:
    delta = sum_k (scale[k] * (A_q[k] . x)) * Bt_q[k]
The rounding error of a row is at most half a step, 1/254 of the row's largest value: on a random
rank-16 delta of the default model's shape about 1.1% of the delta (RMS; bf16 weights: 0.24%).
A delta is a small part of a layer's output; at 5% of it, that error stays below the output's
own rounding to bf16 (tests/lora/test_quantize.py; engine figures in BENCHMARKS.md).
"""

import torch

from loraplex.kernels import cpu as cpu_kernel

INT8_MAX = 127


def quantize(a: torch.Tensor, b_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A_q, Bt_q, scales) of a module's A [..., r, in] and Bt [..., r, out] (any leading
    dimensions, e.g. layers): int8 of the same shapes, and float32 scales [..., r]."""
    a, b_t = a.float(), b_t.float()
    a_step = a.abs().amax(dim=-1) / INT8_MAX  # [..., r]
    b_step = b_t.abs().amax(dim=-1) / INT8_MAX
    # An all-zero row (a padded rank) keeps step 0 and quantizes to zeros.
    a_q = (a / a_step.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).round()
    b_q = (b_t / b_step.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).round()
    return a_q.to(torch.int8), b_q.to(torch.int8), a_step * b_step


def quantize_into(a: torch.Tensor, b_t: torch.Tensor, a_q: torch.Tensor, b_q: torch.Tensor,
                  scales: torch.Tensor) -> None:
    """quantize(a, b_t) written into a_q, b_q and scales (views of slot buffers, rows
    contiguous): by the CPU kernel in one pass where it takes a's dtype (activating an adapter
    stays as fast as copying it), else by quantize."""
    if cpu_kernel.is_available(a.dtype, a.device) and a.dim() == 3:
        a_steps = a.new_empty(a.shape[:2], dtype=torch.float32)
        b_steps = b_t.new_empty(b_t.shape[:2], dtype=torch.float32)
        cpu_kernel.quantize_rows(a.contiguous(), a_q, a_steps)
        cpu_kernel.quantize_rows(b_t.contiguous(), b_q, b_steps)
        scales.copy_(a_steps * b_steps)
        return
    for target, value in zip((a_q, b_q, scales), quantize(a, b_t), strict=True):
        target.copy_(value)


def dequantize(a_q: torch.Tensor, b_q: torch.Tensor,
               scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (A, Bt) whose LoRA delta is the quantized one's: the scales go on A's rows."""
    return a_q.float() * scales[..., None], b_q.float()

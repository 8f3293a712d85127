"""F.linear for many rows of bfloat16 on a CPU without bfloat16 dot-product instructions, computed
in float32: the prefill's matmuls on model/llama.py's fused path.

On such a CPU (no AVX512_BF16, no AMX, no Arm BF16) PyTorch's bfloat16 GEMM converts as it goes
and runs far below the float32 one. Measured on a 2-vCPU Xeon with AVX-512 (SmolLM2-135M's 120
layer matmuls, bf16 weights, medians of 3): 512 rows 1,768 ms by F.linear in bf16 against 612 ms
upcasting x and each weight to float32 for the product; 128 rows 514 against 235; 48 rows 230
against 208; at 32 rows and fewer the conversion (~160 ms a pass over the weights) costs more
than it saves, and kernels/linear_rows.py takes up to 16. A CPU with those instructions keeps
PyTorch's bfloat16 GEMM, which uses them.

The products are exact in float32 and summed in float32, then rounded once to bfloat16, as
PyTorch's bfloat16 GEMM does: the results differ only in the order of the sums.
"""

from __future__ import annotations

import torch

from loraplex.kernels import cpu as cpu_kernel

MIN_ROWS = 48  # the measured crossover above
# A weight is converted this many bytes of float32 at a time, so a large model's layer (a 7B
# model's gate/up projection is 470 MB in float32) never needs a whole float32 copy.
CHUNK_BYTES = 64 << 20


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear() is the faster way to F.linear(x, weight) here."""
    return (x.dim() == 2 and x.shape[0] >= MIN_ROWS and x.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and not cpu_kernel.has_bf16_dot())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [rows, in] and weight [out, in] in bfloat16, through
    float32; returns bfloat16 [rows, out]."""
    xf = x.float()
    out_features, in_features = weight.shape
    y = torch.empty(x.shape[0], out_features, dtype=torch.float32, device=x.device)
    step = max(1, CHUNK_BYTES // (4 * in_features))  # weight rows a chunk
    for start in range(0, out_features, step):
        end = min(start + step, out_features)
        torch.matmul(xf, weight[start:end].float().t(), out=y[:, start:end])
    if bias is not None:
        y += bias.float()
    return y.to(torch.bfloat16)

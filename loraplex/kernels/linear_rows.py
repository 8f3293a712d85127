"""Calls linear_rows.cpp: F.linear for a few rows (decoding tokens) as a stream over the weights at
memory speed, for float32 and bfloat16 on CPU. model/llama.py's Linear and LM head use it for
up to MAX_ROWS rows on its fused path (model/llama.py fused_linear); above that the weights'
reads are shared by enough rows for a GEMM to win (PyTorch's, or kernels/float32_matmul.py's in
bfloat16 where the CPU has no bfloat16 dot products).
"""

from __future__ import annotations

import ctypes

import torch

from loraplex.kernels import cpu as cpu_kernel
from loraplex.kernels.cpu import KernelError

# Measured (SmolLM2-135M's 121 matmuls of a step, bf16, 2 threads): 19 vs 24 ms at 1 row, 47 vs
# 76 ms at 8, 81 vs 122 ms at 16 against F.linear; 16 keeps every measured case a gain.
MAX_ROWS = 16

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = (_I64, _I64, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64, ctypes.c_int)


def takes(x: torch.Tensor) -> bool:
    """Whether linear() takes x [rows, in] (a few rows, its last dimension contiguous)."""
    return x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.stride(-1) == 1


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """F.linear(x, weight, bias): x [rows, in], weight [out, in] contiguous, bias [out]. Sums in
    float32, rounded once to the dtype (PyTorch sums in another order: float32 results differ
    in their last bits)."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    ok = (takes(x) and weight.dtype == x.dtype and weight.is_contiguous()
          and weight.shape == (out_features, in_features))
    if bias is not None:
        ok = ok and bias.dtype == x.dtype and bias.is_contiguous() and bias.shape == (out_features,)
    if not ok:
        raise KernelError("linear_rows: tensors of unexpected dtype, shape or layout")
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    cpu_kernel.entry_point("linear_rows", x.dtype, None, _ARGTYPES)(
        rows, in_features, out_features, x.data_ptr(), x.stride(0), weight.data_ptr(),
        None if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(0),
        torch.get_num_threads())
    return y

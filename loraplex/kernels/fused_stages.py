"""Calls fused_stages.cpp: a layer's small stages between its matmuls as one kernel each (RMSNorm
with the residual add, per-head norm + RoPE + the KV cache write, the gated activation), for
float32 and bfloat16 on CPU. Built with the other CPU kernels (kernels/cpu.py); model/llama.py
uses them when `is_available`, its PyTorch reference path otherwise.
"""

from __future__ import annotations

import ctypes

import torch

from loraplex.kernels import cpu as cpu_kernel
from loraplex.kernels.cpu import KernelError

_SUFFIXES = {torch.float32: "f32", torch.bfloat16: "bf16"}
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}  # ModelConfig.hidden_act -> the kernel's code


def is_available(dtype: torch.dtype, device: torch.device) -> bool:
    return cpu_kernel.is_available(dtype, device) and dtype in _SUFFIXES


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool,
             add: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of x's rows [rows, dim] (model/llama.py RMSNorm's semantics); with `add`, first
    x += add in place (the residual stream taking a sublayer's output). Returns a new tensor."""
    rows, dim = x.shape
    ok = (x.stride(-1) == 1 and weight.dtype == x.dtype and weight.is_contiguous()
          and weight.shape == (dim,))
    if add is not None:
        ok = ok and add.dtype == x.dtype and add.shape == x.shape and add.stride(-1) == 1
    if not ok:
        raise KernelError("rms_norm: tensors of unexpected dtype, shape or layout")
    out = torch.empty_like(x)
    _entry("rms_norm", x.dtype)(
        rows, dim, x.data_ptr(), x.stride(0), None if add is None else add.data_ptr(),
        0 if add is None else add.stride(0), weight.data_ptr(), eps, int(unit_offset),
        out.data_ptr(), out.stride(0), torch.get_num_threads())
    return out


def rope_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
            num_kv_heads: int, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
            eps: float, unit_offset: bool, kv_cache: torch.Tensor,
            slot_mapping: torch.Tensor) -> torch.Tensor:
    """Queries and keys of qkv [tokens, (heads + 2 * kv_heads) * head_dim], each head
    [normalised by q_norm / k_norm, then] rotated by cos / sin [tokens, head_dim]; keys and
    values written to kv_cache [2, rows, kv_heads, head_dim] at slot_mapping [tokens]. Returns
    the rotated queries and keys [tokens, heads + kv_heads, head_dim]."""
    tokens = qkv.shape[0]
    head_dim = kv_cache.shape[3]
    dtype = qkv.dtype
    ok = (qkv.stride(-1) == 1 and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim
          and cos.dtype == dtype and sin.dtype == dtype and cos.is_contiguous()
          and sin.is_contiguous() and cos.shape == (tokens, head_dim) and sin.shape == cos.shape
          and kv_cache.dtype == dtype and kv_cache.is_contiguous()
          and kv_cache.shape[2] == num_kv_heads and slot_mapping.dtype == torch.int64
          and slot_mapping.is_contiguous() and slot_mapping.shape == (tokens,))
    for norm in (q_norm, k_norm):
        ok = ok and (norm is None or (norm.dtype == dtype and norm.shape == (head_dim,)))
    if not ok:
        raise KernelError("rope_kv: tensors of unexpected dtype, shape or layout")
    qk = torch.empty(tokens, num_heads + num_kv_heads, head_dim, dtype=dtype, device=qkv.device)
    status = _entry("rope_kv", dtype)(
        tokens, num_heads, num_kv_heads, head_dim, qkv.data_ptr(), qkv.stride(0),
        cos.data_ptr(), sin.data_ptr(), None if q_norm is None else q_norm.data_ptr(),
        None if k_norm is None else k_norm.data_ptr(), eps, int(unit_offset),
        kv_cache.data_ptr(), kv_cache.shape[1], slot_mapping.data_ptr(), qk.data_ptr(),
        torch.get_num_threads())
    if status == 1:
        raise KernelError("rope_kv: a KV cache row is out of range")
    if status != 0:
        raise KernelError(f"rope_kv: head_dim {head_dim} is not built (even, <= 512)")
    return qk


def gated_act(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up of gate_up [rows, 2 * intermediate] (gate columns first) -> [rows,
    intermediate]; `activation` a ModelConfig.hidden_act."""
    rows, width = gate_up.shape
    if gate_up.stride(-1) != 1 or width % 2 or activation not in ACTIVATIONS:
        raise KernelError("gated_act: tensors of unexpected shape or layout, or activation")
    out = torch.empty(rows, width // 2, dtype=gate_up.dtype, device=gate_up.device)
    _entry("gated_act", gate_up.dtype)(
        rows, width // 2, gate_up.data_ptr(), gate_up.stride(0), ACTIVATIONS[activation],
        out.data_ptr(), out.stride(0), torch.get_num_threads())
    return out


_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {  # kernel -> (restype, argtypes)
    "rms_norm": (None, [_I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, ctypes.c_float, ctypes.c_int,
                        _PTR, _I64, ctypes.c_int]),
    "rope_kv": (ctypes.c_int, [_I64, _I64, _I64, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _PTR,
                               ctypes.c_float, ctypes.c_int, _PTR, _I64, _PTR, _PTR,
                               ctypes.c_int]),
    "gated_act": (None, [_I64, _I64, _PTR, _I64, ctypes.c_int, _PTR, _I64, ctypes.c_int]),
}


def _entry(kernel: str, dtype: torch.dtype):
    restype, argtypes = _SIGNATURES[kernel]
    return cpu_kernel.entry_point(kernel, dtype, restype, tuple(argtypes))

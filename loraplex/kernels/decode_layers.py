"""Calls decode_layers.cpp: all decoder layers of a decode-only step in one C++ call, the same
kernels and roundings as model/llama.py's fused path layer by layer (the tests compare both),
without its ~13 Python calls a layer. model/llama.py's LlamaModel.forward takes a DecodeLayers
for a step where every token is a decoding sequence's one new token (at most
linear_rows.MAX_ROWS of them); the engine's ModelRunner builds it.

Set LORAPLEX_DECODE_LAYERS=0 to keep the layer-by-layer path (for side-by-side measurements).
"""

from __future__ import annotations

import ctypes
import os

import torch

from loraplex.kernels import cpu as cpu_kernel
from loraplex.kernels import fused_stages, linear_rows
from loraplex.kernels.cpu import KernelError

ENV = "LORAPLEX_DECODE_LAYERS"  # "0": never use it
# The fields of a layer's row and of the shape, in decode_layers.cpp's order.
LAYER_FIELDS = ("input_norm", "qkv_weight", "qkv_bias", "q_norm", "k_norm", "o_weight",
                "post_norm", "gate_up_weight", "down_weight", "kv_cache")
LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
LORA_FIELDS = ("kind", "rows", "a", "scales", "modules", "b0", "b1", "b2", "out0", "out1", "out2")
LORA_KINDS = {"add_lora": 1, "add_lora_int8": 2}  # LoraKernel.kernel -> the C++ kind
SHAPE_FIELDS = ("hidden", "inter", "heads", "kv_heads", "head_dim", "unit_offset", "act",
                "kv_rows")

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = (_I64, _I64, _PTR, _PTR, ctypes.c_float, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR,
             _I64, ctypes.c_float, _I64, _PTR, _I64, _PTR, ctypes.c_int)
_ERRORS = {1: "a KV cache row or length is out of range",
           2: "a head shape or grouping it is not built for",
           3: "a LoRA segment's slot, tokens or rows are out of range"}


def takes_model(model, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this model (model/llama.py LlamaModel) can run its decode steps here: the fused
    stages and decode attention run on this device, and its family needs nothing the C++ layer
    loop does not do (Gemma 3's sandwich norms and local RoPE keep the Python path)."""
    config = model.config
    return (os.environ.get(ENV) != "0" and fused_stages.is_available(dtype, device)
            and cpu_kernel.attention_is_available(dtype, device, config.num_heads,
                                                  config.num_kv_heads, config.head_dim)
            and not config.sandwich_norms and config.rope_local_theta is None
            and config.hidden_act in fused_stages.ACTIVATIONS)


def takes_step(x: torch.Tensor, attn, adapters) -> bool:
    """Whether a step of these tokens x [tokens, hidden] can run as one call: decode tokens only,
    a few of them, attention by the kernel (lengths given), LoRA by the kernel's segments."""
    return (not attn.prefills and attn.num_decode_tokens == x.shape[0]
            and x.shape[0] <= linear_rows.MAX_ROWS and attn.decode_lens is not None
            and (adapters is None or adapters.kernel_segments is not None))


class DecodeLayers:
    """The layer table of one model and its KV caches: pointers to every layer's weights, KV
    cache and LoRA slot buffers, read once here. Build it after the adapter slots are attached
    (lora/slots.py); the tensors it points to must live as long as it does, which the model,
    the KV cache list it keeps, and the slots' LoraKernels see to."""

    def __init__(self, model, kv_caches: list[torch.Tensor]):
        config = model.config
        self.dtype = model.embed_tokens.weight.dtype
        self.kv_caches = kv_caches  # kept: the table holds their pointers
        rows = []
        for layer, kv_cache in zip(model.layers, kv_caches, strict=True):
            attention, mlp = layer.self_attn, layer.mlp
            params = [layer.input_layernorm.weight, attention.qkv_proj.weight,
                      attention.qkv_proj.bias, getattr(attention.q_norm, "weight", None),
                      getattr(attention.k_norm, "weight", None), attention.o_proj.weight,
                      layer.post_attention_layernorm.weight, mlp.gate_up_proj.weight,
                      mlp.down_proj.weight, kv_cache]
            if any(p is not None and (p.dtype != self.dtype or not p.is_contiguous())
                   for p in params):
                raise KernelError("decode_layers: a weight or KV cache of unexpected dtype or "
                                  "layout")
            row = [0 if p is None else p.data_ptr() for p in params]
            for path in LINEARS:
                row += self._lora_fields(layer.get_submodule(path))
            rows.append(row)
        self.table = torch.tensor(rows, dtype=torch.int64)  # [num_layers, fields]
        unit_offset = int(config.norm_unit_offset)
        self.shape = torch.tensor(
            [config.hidden_size, config.intermediate_size, config.num_heads,
             config.num_kv_heads, config.head_dim, unit_offset,
             fused_stages.ACTIVATIONS[config.hidden_act], kv_caches[0].shape[1]],
            dtype=torch.int64)
        self.hidden, self.head_dim = config.hidden_size, config.head_dim
        self.eps = config.rms_norm_eps
        self.scale = model.layers[0].self_attn.scale
        self.num_layers = len(rows)

    def _lora_fields(self, linear) -> list[int]:
        kernel = linear.lora_kernel
        if linear.lora_a is None:
            return [0] * len(LORA_FIELDS)
        if kernel is None or kernel.dtype not in (None, self.dtype):
            raise KernelError("decode_layers: a layer's LoRA slots have no CPU kernel bound")
        num_rows, a, scales, num_modules, *per_module = kernel.weights
        return [LORA_KINDS[kernel.kernel], num_rows, a, scales, num_modules, *per_module]

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn,
                 adapters) -> torch.Tensor:
        """Runs every layer on x [tokens, hidden] (the embeddings, updated in place: the
        residual stream after the last layer) for a step `takes_step` accepts; cos / sin
        [tokens, head_dim]."""
        rows, hidden = x.shape
        kv_rows, lens, slots = attn.decode_kv_indices, attn.decode_lens, attn.slot_mapping
        ok = (x.dtype == self.dtype and x.is_contiguous() and hidden == self.hidden
              and all(t.dtype == self.dtype and t.is_contiguous()
                      and t.shape == (rows, self.head_dim) for t in (cos, sin))
              and all(t.dtype == torch.int64 and t.is_contiguous() and t.shape == (rows,)
                      for t in (lens, slots))
              and kv_rows.dtype == torch.int64 and kv_rows.dim() == 2
              and kv_rows.shape[0] == rows and kv_rows.stride(-1) == 1)
        segments = places = None
        if adapters is not None:
            segments, places = adapters.kernel_segments, adapters.kernel_places
            ok = (ok and segments is not None and segments.is_contiguous()
                  and places.is_contiguous())
        if not ok:
            raise KernelError("decode_layers: tensors of unexpected dtype, shape or layout")
        status = cpu_kernel.entry_point("decode_layers", self.dtype, ctypes.c_int, _ARGTYPES)(
            rows, self.num_layers, self.table.data_ptr(), self.shape.data_ptr(), self.eps,
            x.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), kv_rows.data_ptr(),
            kv_rows.stride(0), lens.data_ptr(), kv_rows.shape[1], self.scale,
            0 if segments is None else segments.shape[0],
            None if segments is None else segments.data_ptr(),
            0 if places is None else places.shape[0],
            None if places is None else places.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise KernelError(f"decode_layers: {_ERRORS.get(status, f'status {status}')}")
        return x


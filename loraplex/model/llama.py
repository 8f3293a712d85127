"""The llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, Phi-3/4, Gemma 3, SmolLM2), read
top to bottom. The families differ by ModelConfig switches (model/model_config.py), each named
where it acts.

One forward pass takes a flat batch of tokens from many sequences (decode tokens first, then
prefill chunks), writes their keys and values into a paged KV cache, and applies each token's
LoRA adapter from stacked slot buffers (see loraplex/lora/ops.py). The base weights are never
modified by adapters.
"""

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.kernels import cpu as cpu_kernel
from loraplex.kernels import decode_layers, float32_matmul, fused_stages, linear_rows
from loraplex.lora.modules import DOWN_PROJ, GATE_PROJ, O_PROJ, Q_PROJ
from loraplex.lora.ops import AdapterBatch, add_lora
from loraplex.model.model_config import ModelConfig
from loraplex.model.rope import cos_sin, rope_inv_freq, rotate_half


@dataclass(frozen=True)
class PrefillChunk:
    """One sequence's prompt chunk in this step."""

    query_start: int  # index of its first token in the flat batch
    query_len: int
    context_len: int  # tokens in the KV cache after this chunk (earlier chunks + this one)
    kv_indices: torch.Tensor | None  # [context_len] KV cache rows; None when there is no history


@dataclass(frozen=True)
class AttentionMetadata:
    """Where this step's tokens live in the KV cache; built once per step, used by every layer."""

    slot_mapping: torch.Tensor  # [num_tokens] KV cache row each new token's key/value goes to
    num_decode_tokens: int  # the first tokens of the batch: one per decoding sequence
    decode_kv_indices: torch.Tensor | None  # [num_decode, max_context] KV cache rows to attend
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_context] True where attendable
    prefills: tuple[PrefillChunk, ...]
    # [num_decode] context lengths, given instead of decode_mask when the CPU kernel does decode
    # attention (kernels/decode_attention.cpp): it reads the cache rows in place, no gather
    decode_lens: torch.Tensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.unit_offset = unit_offset  # Gemma: scale by (1 + weight), all in float32
        self.fused = False  # kernels/fused_stages.py instead of PyTorch ops (use_fused_stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return fused_stages.rms_norm(x, self.weight, self.eps, self.unit_offset)
        # Normalise in float32 whatever the model dtype, as the reference implementations do.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + h, this norm of x + h): the residual stream taking a sublayer's output h and
        the next sublayer's input. The fused kernel adds into x in place (x is the residual
        stream's own tensor, made by the previous add)."""
        if self.fused:
            return x, fused_stages.rms_norm(x, self.weight, self.eps, self.unit_offset, add=h)
        x = x + h
        return x, self(x)


def make_norm(config: ModelConfig, dim: int | None = None) -> RMSNorm:
    return RMSNorm(dim or config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """F.linear on the fused path: a few rows as a stream over the weights (linear_rows), many
    rows of bfloat16 in float32 where the CPU has no bfloat16 dot products (float32_matmul),
    else PyTorch's."""
    if linear_rows.takes(x):
        return linear_rows.linear(x, weight, bias)
    if float32_matmul.takes(x, weight):
        return float32_matmul.linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    """A base linear layer plus, per token, the LoRA delta of that token's adapter slot.

    A fused linear (q/k/v, gate/up) holds several modules side by side in its output columns.
    `lora_a` / `lora_b` are the stacked slot buffers, attached by `AdapterSlots`: one A for all
    its modules (they read the same input) and one B per module, plus `lora_scales` when they
    hold int8 weights. Until then (or for a step where no token has an adapter) this is a plain
    linear layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.lora_a: torch.Tensor | None = None  # [max_loras, modules * max_rank, in_features]
        self.lora_b: tuple[torch.Tensor, ...] = ()  # per module [max_loras, max_rank, out_i]
        self.lora_scales: torch.Tensor | None = None  # int8 weights: [max_loras, modules * r]
        self.lora_kernel: cpu_kernel.LoraKernel | None = None  # the CPU kernel bound to them
        self.fused = False  # fused_linear instead of F.linear (use_fused_stages)

    def attach_lora(self, lora_a: torch.Tensor, lora_b: tuple[torch.Tensor, ...],
                    lora_scales: torch.Tensor | None) -> None:
        """Take these slot buffers (lora/slots.py), and bind the CPU kernel to them where it
        runs, so a step's call checks only its own inputs."""
        self.lora_a, self.lora_b, self.lora_scales = lora_a, lora_b, lora_scales
        dtype = lora_b[0].dtype if lora_scales is None else self.weight.dtype
        self.lora_kernel = (cpu_kernel.LoraKernel(lora_a, lora_b, lora_scales)
                            if cpu_kernel.is_available(dtype, lora_a.device) else None)

    def forward(self, x: torch.Tensor, adapters: AdapterBatch | None) -> torch.Tensor:
        if self.fused:
            y = fused_linear(x, self.weight, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        if adapters is not None and self.lora_a is not None:
            y = add_lora(y, x, self.lora_a, self.lora_b, adapters, self.lora_scales,
                         self.lora_kernel)
        return y


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        self.q_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.fused = False  # kernels/fused_stages.py instead of PyTorch ops (use_fused_stages)
        shapes = config.module_shapes()
        # q, k and v read the same input: one matmul (and one LoRA shrink) for all three.
        self.qkv_sizes = config.fused_out_features("self_attn.qkv_proj")
        self.qkv_proj = Linear(shapes[Q_PROJ][0], sum(self.qkv_sizes), bias=config.qkv_bias)
        self.o_proj = Linear(*shapes[O_PROJ])

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        cos: torch.Tensor,  # [num_tokens, head_dim]
        sin: torch.Tensor,  # [num_tokens, head_dim]
        kv_cache: torch.Tensor,  # [2, num_kv_rows, num_kv_heads, head_dim]
        attn: AttentionMetadata,
        adapters: AdapterBatch | None,
    ) -> torch.Tensor:
        n = x.shape[0]
        q_size, k_size, _ = self.qkv_sizes
        qkv = self.qkv_proj(x, adapters)  # [num_tokens, q_size + 2 * k_size]
        qk = self._rope_and_cache(qkv, cos, sin, kv_cache, attn.slot_mapping)
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
        v = qkv[:, q_size + k_size:].reshape(n, self.num_kv_heads, self.head_dim)

        out = torch.empty_like(q)  # [num_tokens, num_heads, head_dim]
        nd = attn.num_decode_tokens
        if nd and attn.decode_lens is not None:
            cpu_kernel.decode_attention(out[:nd], q[:nd], kv_cache, attn.decode_kv_indices,
                                        attn.decode_lens, self.scale)
        elif nd:
            # Decode: one query per sequence, all sequences at once, keys padded to the longest.
            keys = kv_cache[0][attn.decode_kv_indices]  # [nd, max_context, kv_heads, head_dim]
            values = kv_cache[1][attn.decode_kv_indices]
            if q.device.type == "cpu" and q.dtype != torch.float32:
                out[:nd] = self._decode_matmul(q[:nd], keys, values, attn.decode_mask)
            else:
                out[:nd] = self._sdpa(q[:nd, None], keys, values, attn.decode_mask)[:, 0]
        for chunk in attn.prefills:
            rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
            if chunk.kv_indices is None:  # a whole prompt: attend to its own fresh keys, causally
                o = self._sdpa(q[None, rows], k[None, rows], v[None, rows], mask=None)
            else:  # a later chunk: attend to the cached history too
                keys = kv_cache[0][chunk.kv_indices][None]  # [1, context_len, kv_heads, head_dim]
                values = kv_cache[1][chunk.kv_indices][None]
                mask = _chunk_mask(chunk.query_len, chunk.context_len, x.device)
                o = self._sdpa(q[None, rows], keys, values, mask)
            out[rows] = o[0]
        return self.o_proj(out.view(n, -1), adapters)

    def _rope_and_cache(self, qkv, cos, sin, kv_cache, slot_mapping) -> torch.Tensor:
        """The queries and keys of qkv, rotated [num_tokens, heads + kv_heads, head_dim]; keys
        and values written to the KV cache at slot_mapping [num_tokens]."""
        q_norm, k_norm = self.q_norm, self.k_norm
        if self.fused and q_norm is None:
            return fused_stages.rope_kv(qkv, cos, sin, self.num_heads, self.num_kv_heads,
                                        None, None, 0.0, False, kv_cache, slot_mapping)
        if self.fused:  # the two head norms share eps and offset (make_norm)
            return fused_stages.rope_kv(qkv, cos, sin, self.num_heads, self.num_kv_heads,
                                        q_norm.weight, k_norm.weight, q_norm.eps,
                                        q_norm.unit_offset, kv_cache, slot_mapping)
        n, q_size, k_size = qkv.shape[0], self.qkv_sizes[0], self.qkv_sizes[1]
        # q and k are side by side: rotate both heads at once.
        qk = qkv[:, : q_size + k_size].reshape(n, self.num_heads + self.num_kv_heads, -1)
        if q_norm is not None:  # Qwen3, Gemma 3: each query and key head normalised first
            h = self.num_heads
            qk = torch.cat((q_norm(qk[:, :h]), k_norm(qk[:, h:])), dim=1)
        qk = qk * cos[:, None] + rotate_half(qk) * sin[:, None]
        kv_cache[0].index_copy_(0, slot_mapping, qk[:, self.num_heads:])
        v = qkv[:, q_size + k_size:].reshape(n, self.num_kv_heads, self.head_dim)
        kv_cache[1].index_copy_(0, slot_mapping, v)
        return qk

    def _decode_matmul(self, q, k, v, mask):
        """One query per sequence as two batched matmuls: q [nd, heads, dim], k/v [nd, ctx,
        kv_heads, dim], mask [nd, 1, 1, ctx] -> [nd, heads, dim]. On CPU in bf16/fp16, PyTorch's
        SDPA kernel with a mask takes ~5x longer than this (measured: 5.7 vs 1.1 ms for 32
        sequences of 320 tokens); scores and softmax stay in float32."""
        nd, ctx, kv_heads, dim = k.shape
        q = q.view(nd, kv_heads, -1, dim)  # [nd, kv_heads, group, dim]: the heads sharing a kv head
        scores = torch.matmul(q, k.permute(0, 2, 3, 1)).float() * self.scale  # [nd, kv, grp, ctx]
        scores = scores.masked_fill(~mask.view(nd, 1, 1, ctx), float("-inf"))
        probs = scores.softmax(-1).to(v.dtype)
        return torch.matmul(probs, v.transpose(1, 2)).view(nd, -1, dim)  # [nd, heads, dim]

    def _sdpa(self, q, k, v, mask):
        """q [b, q_len, heads, dim], k/v [b, kv_len, kv_heads, dim] -> [b, q_len, heads, dim]."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True
        )
        return o.transpose(1, 2)


def _chunk_mask(query_len: int, context_len: int, device: torch.device) -> torch.Tensor:
    """[1, 1, query_len, context_len]: query i (at position context_len - query_len + i) sees
    every key at or before its own position."""
    q_pos = torch.arange(context_len - query_len, context_len, device=device)[:, None]
    k_pos = torch.arange(context_len, device=device)[None, :]
    return (k_pos <= q_pos)[None, None]


# ModelConfig.hidden_act -> the gate's activation: SwiGLU, or Gemma's GeGLU (tanh-approximated).
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": partial(F.gelu, approximate="tanh")}


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        shapes = config.module_shapes()
        # gate and up read the same input: one matmul (and one LoRA shrink) for both.
        self.gate_up_proj = Linear(shapes[GATE_PROJ][0], 2 * config.intermediate_size)
        self.down_proj = Linear(*shapes[DOWN_PROJ])
        self.hidden_act = config.hidden_act
        self.fused = False  # kernels/fused_stages.py instead of PyTorch ops (use_fused_stages)

    def forward(self, x: torch.Tensor, adapters: AdapterBatch | None) -> torch.Tensor:
        gate_up = self.gate_up_proj(x, adapters)  # [num_tokens, 2 * intermediate]
        if self.fused:
            h = fused_stages.gated_act(gate_up, self.hidden_act)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            h = ACTIVATIONS[self.hidden_act](gate) * up
        return self.down_proj(h, adapters)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_type: str):
        super().__init__()
        self.is_sliding = layer_type == "sliding_attention"  # Gemma 3: takes the local RoPE
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config)
        # With sandwich norms (Gemma 3) this one normalises the attention output; otherwise the
        # MLP input. Both go by Hugging Face's name.
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)
        self.sandwich_norms = config.sandwich_norms
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = make_norm(config)
            self.post_feedforward_layernorm = make_norm(config)

    def forward(self, x, cos, sin, kv_cache, attn, adapters):
        h = self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, attn, adapters)
        if not self.sandwich_norms:
            x, h = self.post_attention_layernorm.add_and_norm(x, h)
            return x + self.mlp(h, adapters)
        x, h = self.pre_feedforward_layernorm.add_and_norm(x, self.post_attention_layernorm(h))
        return x + self.post_feedforward_layernorm(self.mlp(h, adapters))


class LlamaModel(nn.Module):
    """Embeddings, decoder layers, final norm and LM head. Parameter names follow Hugging Face's
    (minus the `model.` prefix), so checkpoints load by name."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layer_types = config.layer_types or ("full_attention",) * config.num_layers
        self.layers = nn.ModuleList(DecoderLayer(config, kind) for kind in layer_types)
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.fused = False  # the LM head by fused_linear (use_fused_stages)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        if config.rope_local_theta:  # Gemma 3's sliding-window layers
            self.register_buffer("inv_freq_local", rope_inv_freq(config, local=True),
                                 persistent=False)

    def use_fused_stages(self, enabled: bool) -> None:
        """Run the small stages between the matmuls (norms, RoPE and the KV cache write, the
        gated activation) as kernels/fused_stages.py's kernels, and the matmuls by fused_linear,
        or as the PyTorch reference ops: the same results to
        rounding (tests/kernels/), a few dozen fewer ops per layer. Only where
        fused_stages.is_available for the weights' dtype and device."""
        self.fused = enabled
        for module in self.modules():
            if isinstance(module, RMSNorm | Attention | MLP | Linear):
                module.fused = enabled

    def init_rope(self, device: torch.device) -> None:
        """(Re)compute the RoPE buffers, e.g. after building on "meta", which holds no data."""
        self.inv_freq = rope_inv_freq(self.config).to(device)
        if self.config.rope_local_theta:
            self.inv_freq_local = rope_inv_freq(self.config, local=True).to(device)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[torch.Tensor],  # num_layers x [2, num_kv_rows, num_kv_heads, head_dim]
        attn: AttentionMetadata,
        adapters: AdapterBatch | None,
        logits_indices: torch.Tensor,  # [num_outputs] which tokens need next-token logits
        layers_kernel: decode_layers.DecodeLayers | None = None,
    ) -> torch.Tensor:
        """Returns float32 logits [num_outputs, vocab_size]. With `layers_kernel` (built for
        this model and these kv_caches), a decode-only step it takes runs its layers as one
        C++ call on the fused path (use_fused_stages)."""
        x = self.embed_tokens(input_ids)
        if self.config.scale_embeddings:  # Gemma: by sqrt(hidden_size), rounded to the dtype
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        rope = cos_sin(positions, self.inv_freq, x.dtype)
        local = rope
        if self.config.rope_local_theta:
            local = cos_sin(positions, self.inv_freq_local, x.dtype)
        if (self.fused and layers_kernel is not None
                and decode_layers.takes_step(x, attn, adapters)):
            x = layers_kernel(x, *rope, attn, adapters)  # no sliding layers (takes_model)
        else:
            for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
                x = layer(x, *(local if layer.is_sliding else rope), kv_cache, attn, adapters)
        x = self.norm(x[logits_indices])
        if self.fused:
            return fused_linear(x, self.lm_head.weight).float()
        return self.lm_head(x).float()

"""Capacity planning: how many adapters and how much context fit in a memory budget.

Pure arithmetic on a model's shape, so an operator can size a deployment before loading anything
(no torch here; `loraplex plan` is the command line front). The figures follow what the engine
actually allocates:

- an adapter in a device slot takes pages of its own rank (lora/pages.py: its rank rounded up
  to whole pages of `page_rank` rank rows), each page holding every targetable module
  (`AdapterSlots` builds buffers for all seven modules, whatever an adapter targets), so a slot
  costs more than an attention-only adapter does, and a rank-8 adapter an eighth of a rank-64
  one; a mix of ranks is planned by its mean;
- the host cache holds each adapter as loaded (`LoRAWeights`: only its target modules);
- the KV cache is whole blocks of `block_size` tokens (`ModelRunner.kv_bytes_per_block`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from loraplex.lora.modules import ATTENTION_MODULES, K_PROJ, Q_PROJ, TARGET_MODULES, V_PROJ
from loraplex.lora.pages import DEFAULT_PAGE_RANK, pages_for

if TYPE_CHECKING:  # a type only: importing it at run time would import torch
    from loraplex.model.model_config import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TARGET_GROUPS = {"all": TARGET_MODULES, "attn": ATTENTION_MODULES}

# Runtime overhead kept out of the plan: 10% of the budget for allocator fragmentation and
# temporaries, plus a fixed 512 MiB for one step's activations and logits (and, on a GPU, the
# CUDA context, itself a few hundred MiB).
RESERVE_PERCENT = 10
ACTIVATION_RESERVE_BYTES = 512 * 2**20
# Slots take at most a quarter of what is left after the base weights, so adding adapters never
# starves the KV cache that every request needs.
SLOT_SHARE_PERCENT = 25
# Beyond 64 distinct adapters in one batch the LoRA op's per-slot work outweighs sharing a batch;
# more adapters are better served by the host cache.
MAX_LORAS_CAP = 64
# The host cache may use a quarter of host memory; the rest is the process, the OS and, on a
# CPU-only machine, the model itself.
HOST_CACHE_SHARE_PERCENT = 25
# The engine's defaults (EngineConfig.block_size, llm_engine.MAX_DEFAULT_MODEL_LEN).
BLOCK_SIZE = 16
MAX_DEFAULT_MODEL_LEN = 4096

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")

# Base-weight formats: "auto" keeps the model's dtype. int8 and 4bit are what a quantized base
# would take (loraplex itself serves base weights in the model's dtype): the decoder layers'
# linear weights at 8 or 4 bits plus one 2-byte scale per group of QUANT_GROUP_SIZE weights
# (bitsandbytes' NF4 block size), while embeddings, LM head and norms keep the model's dtype,
# as bitsandbytes, GPTQ and AWQ leave them.
WEIGHT_BITS = {"auto": None, "int8": 8, "4bit": 4}
QUANT_GROUP_SIZE = 64
QUANT_SCALE_BYTES = 2

class PlanError(ValueError):
    """Planning inputs that make no sense or a budget too small; the message says which."""


@dataclass(frozen=True)
class CapacityPlan:
    """A deployment sized for a memory budget. Every size is in bytes."""

    # what was asked
    rank: int  # the largest of ranks (--max-lora-rank)
    ranks: tuple[int, ...]  # the adapters' ranks, a mix of equally many of each
    targets: tuple[str, ...]
    clients: int
    memory_bytes: int  # device budget: weights, slots, KV cache and runtime overhead
    host_memory_bytes: int  # RAM for the host cache
    dtype_bytes: int
    int8_slots: bool  # slots hold int8 adapter weights (EngineConfig.lora_dtype="int8")
    weights: str  # base-weight format, a WEIGHT_BITS name
    # the model
    num_base_params: int
    base_weight_bytes: int  # in the `weights` format
    bytes_per_adapter: int  # one adapter as loaded into the host cache (its target modules; mean)
    bytes_per_slot: int  # one adapter in device slots (its pages; mean over the ranks)
    bytes_per_page: int  # page_rank rank rows of all seven modules, scales if int8
    page_rank: int
    kv_bytes_per_token: int
    context_len: int  # tokens of one full-context sequence (the engine's default max_model_len)
    # the budget
    reserve_bytes: int  # runtime overhead kept free
    available_bytes: int  # memory_bytes - base weights - reserve: for slots and the KV cache
    min_memory_bytes: int  # the least budget that holds the base, one slot and one sequence
    max_resident_adapters: int  # most slots that fit, keeping KV room for one sequence
    max_loras: int  # recommended device slots
    max_lora_pages: int  # the pages max_loras adapters of the mix take
    slot_bytes: int  # max_lora_pages * bytes_per_page
    kv_cache_bytes: int  # what is left for the KV cache
    num_kv_tokens: int  # tokens that KV cache holds (whole blocks)
    num_full_context_seqs: int  # full-context sequences it holds at once
    max_cpu_loras: int  # recommended host cache size (>= max_loras)
    host_cache_bytes: int  # max_cpu_loras * bytes_per_adapter
    # versus one model per client
    dedicated_bytes: int  # clients x (base weights + 1/clients of the same KV cache)
    loraplex_bytes: int  # base weights + slots + KV cache (reserve left out on both sides)
    dedicated_storage_bytes: int  # on disk: clients x a fine-tuned copy of the base
    loraplex_storage_bytes: int  # on disk: one base + clients x one adapter

    @property
    def dedicated_ratio(self) -> float:
        """How many times more memory one model per client needs than loraplex."""
        return self.dedicated_bytes / self.loraplex_bytes


def parse_bytes(text: str) -> int:
    """'24GiB', '512MiB', '8GB', '1.5GiB' or '1000000' (bytes) -> a positive number of bytes."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).upper() if match else None
    if unit not in _UNITS:
        raise PlanError(
            f"cannot read memory size {text!r}; write a number with an optional unit, "
            "e.g. 24GiB, 512MiB, 8GB or 1000000 (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    number = int(Decimal(match.group(1)) * _UNITS[unit])  # Decimal: '1.5GiB' is exact
    if number <= 0:
        raise PlanError(f"memory size must be positive, got {text!r}")
    return number


def format_bytes(num_bytes: int) -> str:
    """A size in the largest binary unit that keeps the number at least 1: '18.6 MiB'."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{num_bytes} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def parse_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'all', 'attn', 'q_proj,v_proj' or a list of module names -> module names in model order."""
    if isinstance(spec, str):
        if spec.strip() in TARGET_GROUPS:
            return TARGET_GROUPS[spec.strip()]
        spec = spec.split(",")
    names = {name.strip() for name in spec}
    unknown = sorted(names - set(TARGET_MODULES))
    if unknown or not names:
        raise PlanError(
            f"unknown target module(s) {', '.join(map(repr, unknown)) or 'none given'}; "
            f"use 'all', 'attn' or a comma list of: {', '.join(TARGET_MODULES)}"
        )
    return tuple(name for name in TARGET_MODULES if name in names)


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a model dtype name."""
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    return DTYPE_BYTES[dtype]


def weight_bits(weights: str) -> int | None:
    """Bits per base linear weight of a WEIGHT_BITS name (None: the model's dtype)."""
    if weights not in WEIGHT_BITS:
        raise PlanError(f"weights must be one of {', '.join(WEIGHT_BITS)}, got {weights!r}")
    return WEIGHT_BITS[weights]


def count_linear_params(config: ModelConfig) -> int:
    """Weights of the decoder layers' linear layers (what a quantized base stores in few bits)."""
    return config.num_layers * sum(i * o for i, o in config.module_shapes().values())


def count_base_params(config: ModelConfig) -> int:
    """Parameters of the base model: embeddings, an untied LM head, every layer, final norm."""
    shapes = config.module_shapes()
    num_norms = 4 if config.sandwich_norms else 2  # Gemma 3 norms after attention and MLP too
    per_layer = num_norms * config.hidden_size
    if config.qk_norm:  # Qwen3, Gemma 3: one weight over head_dim each for q and k
        per_layer += 2 * config.head_dim
    if config.qkv_bias:
        per_layer += sum(shapes[name][1] for name in (Q_PROJ, K_PROJ, V_PROJ))  # Qwen2 biases
    embeddings = config.vocab_size * config.hidden_size
    lm_head = 0 if config.tie_word_embeddings else embeddings
    other = embeddings + lm_head + config.num_layers * per_layer + config.hidden_size
    return count_linear_params(config) + other


def base_weight_bytes(config: ModelConfig, dtype_bytes: int, bits: int | None = None) -> int:
    """Bytes of the base weights in the model's dtype, or with the linear layers at `bits`."""
    num_params = count_base_params(config)
    if bits is None:
        return num_params * dtype_bytes
    linear = count_linear_params(config)
    quantized = linear * bits // 8 + -(-linear // QUANT_GROUP_SIZE) * QUANT_SCALE_BYTES
    return quantized + (num_params - linear) * dtype_bytes


def lora_bytes(config: ModelConfig, rank: int, targets: Sequence[str], dtype_bytes: int) -> int:
    """Bytes of one adapter: A [rank, in] and B [out, rank] per targeted module, every layer."""
    shapes = config.module_shapes()
    per_layer = sum(rank * (shapes[name][0] + shapes[name][1]) for name in targets)
    return config.num_layers * per_layer * dtype_bytes


def device_slot_bytes(config: ModelConfig, rank: int, dtype_bytes: int, int8: bool = False) -> int:
    """Bytes of one device slot: all seven modules at `rank`, in the model's dtype, or as int8
    with one float32 scale per rank row of each module (lora/slots.py)."""
    if not int8:
        return lora_bytes(config, rank, TARGET_MODULES, dtype_bytes)
    scales = config.num_layers * len(TARGET_MODULES) * rank * 4
    return lora_bytes(config, rank, TARGET_MODULES, 1) + scales


def parse_ranks(text: str) -> tuple[int, ...]:
    """'16' or a mix '8,16,32,64' -> the ranks."""
    try:
        ranks = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise PlanError(f"rank must be a positive integer or a comma list of them, e.g. "
                        f"8,16,32,64; got {text!r}") from None
    for value in ranks:
        _positive_int("rank", value)
    return ranks


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PlanError(f"{name} must be a positive integer, got {value!r}")


def plan_capacity(
    model_config: ModelConfig,
    *,
    rank: int | Sequence[int],
    targets: str | Sequence[str],
    clients: int,
    memory_bytes: int,
    dtype_bytes: int = 4,
    host_memory_bytes: int | None = None,
    int8_slots: bool = False,
    weights: str = "auto",
    page_rank: int = DEFAULT_PAGE_RANK,
) -> CapacityPlan:
    """Size slots, host cache and KV cache for `clients` adapters in `memory_bytes`.

    `rank`: the adapters' rank, or a mix of ranks (as many adapters of each), sized by what
    each takes: its pages of `page_rank` rank rows in the slots, its own bytes in the host cache.

    `host_memory_bytes` (RAM for the host cache) defaults to `memory_bytes`; `int8_slots`: the
    slots hold int8 adapter weights (the host cache keeps the model's dtype). Raises PlanError
    on bad inputs or when the budget cannot hold the base model, one slot and one sequence.
    `weights`: the base weights' format (WEIGHT_BITS); adapters, slots and KV cache keep the
    model's dtype whatever it is.
    """
    ranks = tuple(rank) if isinstance(rank, list | tuple) else (rank,)
    for name, value in (*(("rank", r) for r in ranks), ("clients", clients),
                        ("memory_bytes", memory_bytes), ("dtype_bytes", dtype_bytes),
                        ("page_rank", page_rank)):
        _positive_int(name, value)
    if not ranks:
        raise PlanError("rank: give at least one")
    host_memory_bytes = memory_bytes if host_memory_bytes is None else host_memory_bytes
    _positive_int("host_memory_bytes", host_memory_bytes)
    targets = parse_targets(targets)

    num_base_params = count_base_params(model_config)
    base_bytes = base_weight_bytes(model_config, dtype_bytes, weight_bits(weights))
    bytes_per_adapter = -(-sum(lora_bytes(model_config, r, targets, dtype_bytes)
                               for r in ranks) // len(ranks))
    bytes_per_page = device_slot_bytes(model_config, page_rank, dtype_bytes, int8_slots)
    num_pages = [pages_for(r, page_rank) for r in ranks]
    bytes_per_slot = -(-sum(num_pages) * bytes_per_page // len(ranks))  # the mix's mean
    largest_slot = max(num_pages) * bytes_per_page  # the engine keeps room for one
    kv_bytes_per_token = (2 * model_config.num_layers * model_config.num_kv_heads
                          * model_config.head_dim * dtype_bytes)
    context_len = min(model_config.max_position_embeddings, MAX_DEFAULT_MODEL_LEN)
    if model_config.sliding_window:  # the engine caps the context to the window
        context_len = min(context_len, model_config.sliding_window)
    one_seq_kv_bytes = -(-context_len // BLOCK_SIZE) * BLOCK_SIZE * kv_bytes_per_token

    # The smallest budget whose share after the reserve holds the base, one slot, one sequence.
    needed = ACTIVATION_RESERVE_BYTES + base_bytes + largest_slot + one_seq_kv_bytes
    min_memory_bytes = -(-needed * 100 // (100 - RESERVE_PERCENT))
    if memory_bytes < min_memory_bytes:
        raise PlanError(
            f"{format_bytes(memory_bytes)} is too little: the base model needs "
            f"{format_bytes(base_bytes)}, one adapter slot {format_bytes(largest_slot)}, "
            f"one {context_len}-token sequence {format_bytes(one_seq_kv_bytes)} of KV cache, plus "
            f"the runtime reserve ({RESERVE_PERCENT}% + {format_bytes(ACTIVATION_RESERVE_BYTES)}); "
            f"at least {format_bytes(min_memory_bytes)} ({min_memory_bytes} bytes) is needed"
        )
    reserve_bytes = memory_bytes * RESERVE_PERCENT // 100 + ACTIVATION_RESERVE_BYTES
    available_bytes = memory_bytes - reserve_bytes - base_bytes

    # Both bounds are at least one slot of the largest rank, thanks to the check above.
    kv_floor_bound = available_bytes - one_seq_kv_bytes
    max_resident_adapters = kv_floor_bound // bytes_per_slot
    share_bound = max(available_bytes * SLOT_SHARE_PERCENT // 100, largest_slot)
    slot_budget = min(share_bound, kv_floor_bound)
    max_loras = max(1, min(MAX_LORAS_CAP, clients, slot_budget // bytes_per_slot))
    # The pages of max_loras adapters of the mix, at least one of the largest rank's.
    max_lora_pages = max(max(num_pages), -(-max_loras * sum(num_pages) // len(ranks)))
    max_lora_pages = min(max_lora_pages, max(max(num_pages), slot_budget // bytes_per_page))
    slot_bytes = max_lora_pages * bytes_per_page
    kv_cache_bytes = available_bytes - slot_bytes
    num_kv_tokens = kv_cache_bytes // (kv_bytes_per_token * BLOCK_SIZE) * BLOCK_SIZE

    host_share = host_memory_bytes * HOST_CACHE_SHARE_PERCENT // 100
    max_cpu_loras = max(max_loras, min(clients, host_share // bytes_per_adapter))

    return CapacityPlan(
        rank=max(ranks), ranks=ranks, targets=targets, clients=clients, memory_bytes=memory_bytes,
        host_memory_bytes=host_memory_bytes, dtype_bytes=dtype_bytes, int8_slots=int8_slots,
        num_base_params=num_base_params, base_weight_bytes=base_bytes, weights=weights,
        bytes_per_adapter=bytes_per_adapter, bytes_per_slot=bytes_per_slot,
        bytes_per_page=bytes_per_page, page_rank=page_rank, max_lora_pages=max_lora_pages,
        kv_bytes_per_token=kv_bytes_per_token, context_len=context_len,
        reserve_bytes=reserve_bytes, available_bytes=available_bytes,
        min_memory_bytes=min_memory_bytes, max_resident_adapters=max_resident_adapters,
        max_loras=max_loras, slot_bytes=slot_bytes, kv_cache_bytes=kv_cache_bytes,
        num_kv_tokens=num_kv_tokens, num_full_context_seqs=num_kv_tokens // context_len,
        max_cpu_loras=max_cpu_loras, host_cache_bytes=max_cpu_loras * bytes_per_adapter,
        dedicated_bytes=clients * base_bytes + kv_cache_bytes,
        loraplex_bytes=base_bytes + slot_bytes + kv_cache_bytes,
        dedicated_storage_bytes=clients * base_bytes,
        loraplex_storage_bytes=base_bytes + clients * bytes_per_adapter,
    )

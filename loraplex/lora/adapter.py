"""Load a tenant's PEFT LoRA adapter directory into validated, pre-scaled weights.

Adapters are untrusted tenant uploads, so only safetensors is read (pickle can run code when
loaded) and everything the serving kernels assume is checked here, before the adapter gets near
a batch: key layout, shapes, ranks, finiteness, and config options whose math we don't implement.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes

from loraplex.lora.adapter_config import (
    CONFIG_FILE,
    AdapterError,
    pattern_value,
    read_config,
)
from loraplex.lora.modules import ATTENTION_MODULES, FUSED_ADAPTER_MODULES, TARGET_MODULES
from loraplex.lora.packed import cache_file, read_packed, write_packed

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"

# base_model.model.<module path>.lora_A[.<adapter name>].weight; some tools keep the adapter name.
_KEY_RE = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight")
# The module paths a llama LoRA may touch, e.g. model.layers.3.self_attn.q_proj; in a Gemma 3
# multimodal wrapper the language model's layers are under model.language_model (PEFT on
# transformers 5) or language_model.model (earlier). Its vision tower's modules never match.
_MODULE_RE = re.compile(r"(?:model\.(?:language_model\.)?|language_model\.model\.)layers\."
                        r"(?P<layer>\d+)\.(?P<parent>self_attn|mlp)\.(?P<name>\w+)")
# Every module name an adapter may target, and the decoder-layer part that holds it.
_PARENTS = {name: "self_attn" if name in ATTENTION_MODULES else "mlp" for name in TARGET_MODULES}
_PARENTS.update(qkv_proj="self_attn", gate_up_proj="mlp")

# The dtypes an adapter's matrices may have: what PEFT saves, and what torch can sum and scale on
# every device (float8 has no CPU sum; it is not a PEFT training dtype either).
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value, so compare by identity
class LoRAWeights:
    """An adapter's matrices, stacked over layers per module so that activating it into a
    device slot is one copy per module, not one per layer and module."""

    path: Path
    # module name -> (lora_a [num_layers, r, in_features], lora_b_t [num_layers, r, out]), r the
    # module's largest rank; a layer with a smaller rank is zero-padded, one the adapter does
    # not touch is all zeros. lora_b_t is PEFT's lora_B transposed (the layout the LoRA op
    # reads: rows of outputs) times the scaling: the delta is x @ a.T @ b_t.
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    layer_ranks: dict[str, tuple[int, ...]]  # module name -> rank in each layer (0: untouched)

    @property
    def rank(self) -> int:
        """The largest rank over its modules (rank_pattern may vary it)."""
        return max(a.shape[1] for a, _ in self.modules.values())

    @property
    def target_modules(self) -> tuple[str, ...]:
        """Which of TARGET_MODULES it touches, in TARGET_MODULES order."""
        return tuple(m for m in TARGET_MODULES if m in self.modules)

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.modules.values() for t in pair)

    def pairs(self):
        """((layer, module), (lora_a [r, in], lora_b_scaled [out, r])) of every layer and module
        the adapter touches, at that layer's own rank."""
        for module, (a, b_t) in self.modules.items():
            for layer, rank in enumerate(self.layer_ranks[module]):
                if rank:
                    yield (layer, module), (a[layer, :rank], b_t[layer, :rank].T)


def load_adapter(
    path: str | Path,
    *,
    num_layers: int,
    module_shapes: Mapping[str, tuple[int, int]],
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
    read_files: Callable[[], Mapping[str, bytes]] | None = None,
    cache_scope: str = "",
) -> LoRAWeights:
    """module_shapes: module name -> (in_features, out_features) of the base model's linear.
    With a cache_dir, the loaded form is kept there (under cache_scope) and read back next time
    (lora/packed.py). With read_files, the adapter's files come from it ({file name: bytes}, e.g.
    decrypted in memory; called only when the cache has no entry) and `path`, never read, names
    the adapter in messages and the cache."""
    path = Path(path)
    cached = None
    if cache_dir is not None:
        sources = [path] if read_files else [path / CONFIG_FILE, path / WEIGHTS_FILE]
        cached = cache_file(cache_dir, sources, dtype, scope=cache_scope,
                            in_memory=read_files is not None)
    if cached is not None:
        packed = read_packed(cached, num_layers=num_layers, module_shapes=module_shapes,
                             max_rank=max_rank, dtype=dtype)
        if packed is not None:
            return LoRAWeights(path, *packed)
    files = None if read_files is None else read_files()
    weights = _load(path, files, num_layers, module_shapes, max_rank, dtype)
    if cached is not None:
        write_packed(cached, weights, cache_dir)
    return weights


def _load(
    path: Path,
    files: Mapping[str, bytes] | None,
    num_layers: int,
    module_shapes: Mapping[str, tuple[int, int]],
    max_rank: int,
    dtype: torch.dtype,
) -> LoRAWeights:
    config = read_config(path, files)
    pairs = _pair_tensors(path, _read_tensors(path, files), num_layers)
    weights = {}
    for (layer, name), (module_key, a, b) in sorted(pairs.items()):
        where = module_key.removeprefix("model.")  # e.g. layers.3.self_attn.q_proj
        parts = FUSED_ADAPTER_MODULES.get(name, (name,))  # a fused qkv_proj holds q, k and v
        for part in parts:
            if part not in module_shapes:
                raise _error(path, f"{where} targets {part}, which the base model does not have")
        out_sizes = [module_shapes[part][1] for part in parts]
        rank = _check_pair(path, config, where, module_key, a, b,
                           (module_shapes[parts[0]][0], sum(out_sizes)), max_rank)
        alpha = pattern_value(config["alpha_pattern"], module_key, config["lora_alpha"])
        scaling = alpha / math.sqrt(rank) if config["use_rslora"] else alpha / rank
        # Fold the scaling in float32 so a bf16 result is rounded once, not twice.
        b_scaled = (b.float() * scaling).to(dtype)
        if not _is_finite(b_scaled) or not _is_finite(a.to(dtype)):
            raise _error(path, f"{where}: lora_A or lora_B times the scaling ({scaling:g}) "
                               f"overflows {dtype}; lower lora_alpha or the weights")
        for part, b_part in zip(parts, b_scaled.split(out_sizes), strict=True):
            if (layer, part) in weights:
                raise _error(path, f"{where}: layer {layer}'s {part} is adapted twice (by a "
                                   "fused module and by itself)")
            weights[(layer, part)] = (a.to(dtype), b_part)
    if not weights:
        raise _error(path, f"{WEIGHTS_FILE} holds no LoRA tensors")
    return _stack(path, weights, num_layers, module_shapes, dtype)


def _error(path: Path, reason: str) -> AdapterError:
    return AdapterError(f"adapter {path}: {reason}")


def _check_pair(path: Path, config: dict, where: str, module_key: str, a: torch.Tensor,
                b: torch.Tensor, shape: tuple[int, int], max_rank: int) -> int:
    """Check one module's lora_A [r, in] and lora_B [out, r] against the base's (in, out) and
    the adapter's config; returns r."""
    in_features, out_features = shape
    name = where.rsplit(".", 1)[-1]
    rank = a.shape[0]
    if rank < 1:
        raise _error(path, f"lora_A for {where} has shape {tuple(a.shape)}: rank 0")
    if a.shape[1] != in_features:
        raise _error(
            path,
            f"lora_A for {where} has shape {tuple(a.shape)} "
            f"but the base model's {name} takes {in_features} inputs",
        )
    if b.shape[0] != out_features:
        raise _error(
            path,
            f"lora_B for {where} has shape {tuple(b.shape)} "
            f"but the base model's {name} has {out_features} outputs",
        )
    if b.shape[1] != rank:
        raise _error(
            path,
            f"rank mismatch in {where}: lora_A has shape {tuple(a.shape)}, "
            f"lora_B has shape {tuple(b.shape)}",
        )
    expected_rank = pattern_value(config["rank_pattern"], module_key, config["r"])
    if rank != expected_rank:
        raise _error(path, f"{where} has rank {rank} but {CONFIG_FILE} says r={expected_rank}")
    if rank > max_rank:
        raise _error(
            path,
            f"{where} has rank {rank}, above the configured max_rank {max_rank}; "
            f"raise max_rank to at least {rank} to serve it",
        )
    return rank


def _stack(
    path: Path,
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
    num_layers: int,
    module_shapes: Mapping[str, tuple[int, int]],
    dtype: torch.dtype,
) -> LoRAWeights:
    """Per-(layer, module) pairs -> LoRAWeights' per-module stacks over layers."""
    modules, layer_ranks = {}, {}
    for name in TARGET_MODULES:
        layers = {layer: pair for (layer, module), pair in weights.items() if module == name}
        if not layers:
            continue
        rank = max(a.shape[0] for a, _ in layers.values())
        in_features, out_features = module_shapes[name]
        stacked_a = torch.zeros(num_layers, rank, in_features, dtype=dtype)
        stacked_b_t = torch.zeros(num_layers, rank, out_features, dtype=dtype)
        for layer, (a, b) in layers.items():
            stacked_a[layer, : a.shape[0]] = a
            stacked_b_t[layer, : b.shape[1]] = b.T
        modules[name] = (stacked_a, stacked_b_t)
        layer_ranks[name] = tuple(
            layers[layer][0].shape[0] if layer in layers else 0 for layer in range(num_layers)
        )
    return LoRAWeights(path, modules, layer_ranks)


def _is_finite(tensor: torch.Tensor) -> bool:
    # A sum is non-finite whenever any element is NaN/Inf, and costs a tenth of an element-wise
    # check; the exact check only runs to rule out a (huge-value) overflow of the sum.
    return bool(torch.isfinite(tensor.sum()) or torch.isfinite(tensor).all())


def _read_tensors(path: Path, files: Mapping[str, bytes] | None) -> dict[str, torch.Tensor]:
    if files is not None:
        if WEIGHTS_FILE not in files:
            raise _error(path, f"{WEIGHTS_FILE} is missing")
        try:
            # A header and raw tensors, never a pickle (torch.load would unpickle untrusted input).
            return load_safetensors_bytes(files[WEIGHTS_FILE])
        except (SafetensorError, ValueError) as e:
            raise _error(path, f"{WEIGHTS_FILE} is corrupt or truncated ({e})") from e
        except KeyError as e:  # a dtype safetensors knows but torch has no type for
            raise _unknown_dtype(path, e) from None
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        if (path / PICKLE_WEIGHTS_FILE).exists():
            # Deliberately not opened: unpickling an untrusted file can run arbitrary code.
            raise _error(
                path,
                f"only {PICKLE_WEIGHTS_FILE} (pickle) is present and pickle files are never "
                f"loaded; it must be converted to safetensors: re-save the adapter with "
                f"PEFT's save_pretrained to get {WEIGHTS_FILE}",
            )
        raise _error(path, f"{WEIGHTS_FILE} is missing")
    try:
        with safe_open(weights_file, framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise _error(path, f"{WEIGHTS_FILE} is corrupt or truncated ({e})") from e
    except KeyError as e:
        raise _unknown_dtype(path, e) from None


def _unknown_dtype(path: Path, error: KeyError) -> AdapterError:
    return _error(path, f"{WEIGHTS_FILE} holds a tensor of dtype {error.args[0]!r}, which has no "
                        "torch type here; save the adapter in F32, F16 or BF16")


def _pair_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], num_layers: int
) -> dict[tuple[int, str], tuple[str, torch.Tensor, torch.Tensor]]:
    """(layer, module name) -> (module path, lora_A, lora_B), every key accounted for."""
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    module_keys: dict[tuple[int, str], str] = {}
    for key, tensor in tensors.items():
        if "lora_embedding" in key:
            raise _error(
                path,
                f"{WEIGHTS_FILE} has embedding LoRA tensor {key}; "
                "LoRA on embed_tokens is not supported",
            )
        key_match = _KEY_RE.fullmatch(key)
        if key_match is None:
            raise _error(
                path,
                f"{WEIGHTS_FILE} has unexpected tensor {key}; "
                "only lora_A / lora_B weights are supported",
            )
        module_key, which = key_match["module"], key_match["which"]
        module_match = _MODULE_RE.fullmatch(module_key)
        name = module_match["name"] if module_match else None
        if name not in _PARENTS or module_match["parent"] != _PARENTS[name]:
            raise _error(
                path,
                f"{WEIGHTS_FILE} tensor {key} targets module {module_key}, which is not "
                f"supported; LoRA is only served on the language model's "
                f"{', '.join(_PARENTS)}",
            )
        layer = int(module_match["layer"])
        if layer >= num_layers:
            raise _error(
                path,
                f"{WEIGHTS_FILE} tensor {key} is for layer {layer} "
                f"but the base model has num_layers={num_layers}",
            )
        if tensor.dim() != 2 or tensor.dtype not in _FLOAT_DTYPES:
            raise _error(
                path,
                f"{WEIGHTS_FILE} tensor {key} must be a 2-D float matrix (F16, BF16, F32 or "
                f"F64), got shape {tuple(tensor.shape)} {tensor.dtype}",
            )
        if not _is_finite(tensor):
            raise _error(path, f"{WEIGHTS_FILE} tensor {key} contains NaN or Inf")
        pair = found.setdefault((layer, name), {})
        if which in pair:
            raise _error(path, f"{WEIGHTS_FILE} has more than one lora_{which} for {module_key}")
        pair[which] = tensor
        module_keys[(layer, name)] = module_key
    pairs = {}
    for slot, pair in found.items():
        for which, other in (("A", "B"), ("B", "A")):
            if which not in pair:
                raise _error(
                    path,
                    f"{WEIGHTS_FILE} has lora_{other} but no lora_{which} for {module_keys[slot]}",
                )
        pairs[slot] = (module_keys[slot], pair["A"], pair["B"])
    return pairs

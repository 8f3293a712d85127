"""Loaded adapters cached on disk in ready-to-serve form, so that a cold load is one read.

`load_adapter` parses a PEFT adapter's tensors one by one (420 for rank 16 on all seven modules
of a 30-layer model), checks them, folds the scaling in and stacks them over layers: ~20 ms. The
result is written once per (adapter files, dtype) as one safetensors file of two tensors per
module, already scaled and in the serving dtype. A later load of the same adapter reads that file
and checks it again (shapes, ranks, finiteness: it is a file like any other), and its tensors'
sha256, recorded in the file at write: a bit flipped on disk would otherwise serve wrong weights
that pass every shape check. An entry that fails any check is logged and rebuilt from the
adapter itself (for a registry version, its sealed artifact, which has its own AEAD tags).

An entry holds only what the engine serves from (the stacked matrices and their ranks; no
config, no tensor names, no path) and is readable by its owner only: files 0600, dirs 0700.
The entries of an adapter given with a `scope` (its tenant, for registry artifacts) live in a
sub-directory of that name, so that crypto-shredding the tenant (Vault.delete_tenant_vault)
deletes them too.

The cache key covers the adapter files' resolved paths, sizes and modification times, so an
edited adapter gets a new entry; an adapter read from memory (a sealed registry artifact) is
keyed by its path alone, which names immutable content. Serving an entry marks it used; past
MAX_CACHE_BYTES, writing a new one removes the least recently used. Engines keep the cache in
`adapter_cache_dir()`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from loraplex.home import ADAPTER_CACHE_ENV as CACHE_ENV
from loraplex.home import adapter_cache_dir
from loraplex.lora.modules import TARGET_MODULES

__all__ = ["CACHE_ENV", "adapter_cache_dir", "cache_file", "read_packed", "write_packed"]

FORMAT = "loraplex-packed-adapter-3"  # 2: lora_b stored transposed; 3: the tensors' sha256
MAX_CACHE_BYTES = 16 << 30  # ~800 rank-16 all-module adapters of the default model in float32
log = logging.getLogger(__name__)


def cache_file(cache_dir: Path, sources: Sequence[Path], dtype: torch.dtype, *,
               scope: str = "", in_memory: bool = False) -> Path | None:
    """Where the packed form of the adapter read from the `sources` files lives; None if they
    are unreadable (the regular loader then reports why). With in_memory, `sources` is the
    adapter's path alone, naming content that never changes: it is not read."""
    if in_memory:
        identity = [str(dtype), FORMAT, "in-memory", [str(source) for source in sources]]
    else:
        try:
            stats = [(str(source.resolve()), source.stat()) for source in sources]
        except OSError:
            return None
        identity = [str(dtype), FORMAT, [[name, s.st_size, s.st_mtime_ns] for name, s in stats]]
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
    return (cache_dir / scope if scope else cache_dir) / f"{digest}.safetensors"


def write_packed(file: Path, weights, cache_dir: Path | None = None) -> None:
    """Write `weights` (a LoRAWeights) atomically, private to its owner; a cache that cannot be
    written is skipped. `cache_dir`: the cache's root, when `file` is in a scope under it."""
    tensors = {}
    for module, (a, b_t) in weights.modules.items():
        tensors[f"{module}.lora_a"] = a.contiguous()
        tensors[f"{module}.lora_b_t"] = b_t.contiguous()
    metadata = {"format": FORMAT, "layer_ranks": json.dumps(weights.layer_ranks),
                "sha256": tensors_sha256(tensors)}
    try:
        root = cache_dir or file.parent
        for directory in (root, file.parent):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            # A cache made before entries were private may be 0755: close it now.
            os.chmod(directory, 0o700)
        fd, tmp = tempfile.mkstemp(dir=file.parent, suffix=".tmp")  # mode 0600
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, file)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _evict(root, keep=file)
    except OSError:
        pass  # a read-only or full disk: every load takes the regular path


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """The sha256 of the tensors' names and raw bytes, in name order (~1.4 GB/s on one core)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0")
        digest.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _evict(cache_dir: Path, keep: Path) -> None:
    """Remove the least recently used entries until the cache fits MAX_CACHE_BYTES."""
    entries = []
    for entry in [*cache_dir.glob("*.safetensors"), *cache_dir.glob("*/*.safetensors")]:
        try:
            stat = entry.stat()
        except FileNotFoundError:  # another engine removed it first
            continue
        entries.append((stat.st_mtime_ns, stat.st_size, entry))
    total = sum(size for _, size, _ in entries)
    for _, size, entry in sorted(entries):
        if total <= MAX_CACHE_BYTES:
            break
        if entry != keep:
            entry.unlink(missing_ok=True)
            total -= size


def read_packed(
    file: Path,
    *,
    num_layers: int,
    module_shapes: Mapping[str, tuple[int, int]],
    max_rank: int,
    dtype: torch.dtype,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, tuple[int, ...]]] | None:
    """(modules, layer_ranks) as LoRAWeights holds them, or None when there is no usable entry
    (missing, unreadable, another format, damaged, or not servable here: the regular loader
    then loads the adapter, or refuses it with its own message)."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                return None
            layer_ranks = {module: tuple(ranks)
                           for module, ranks in json.loads(metadata["layer_ranks"]).items()}
            # Copies, not views of the memory-mapped file: the host cache keeps them after the
            # checksum below, and a view would serve whatever the disk holds later (a file cut
            # short under it is a SIGBUS that kills the server).
            modules = {module: (f.get_tensor(f"{module}.lora_a").clone(),
                                f.get_tensor(f"{module}.lora_b_t").clone())
                       for module in layer_ranks}
    except FileNotFoundError:
        return None  # not cached yet: the usual case
    except (OSError, SafetensorError, KeyError, ValueError, TypeError) as e:
        log.warning("adapter cache entry %s is unreadable (%s): rebuilt from the adapter",
                    file, e)
        return None
    if not modules:
        return None
    tensors = {f"{module}.{part}": tensor for module, pair in modules.items()
               for part, tensor in zip(("lora_a", "lora_b_t"), pair, strict=True)}
    if tensors_sha256(tensors) != metadata.get("sha256"):
        log.warning("adapter cache entry %s fails its checksum (modified or corrupted on "
                    "disk): rebuilt from the adapter", file)
        return None
    for module, (a, b_t) in modules.items():
        if module not in TARGET_MODULES or module not in module_shapes:
            return None
        in_features, out_features = module_shapes[module]
        rank = a.shape[1] if a.dim() == 3 else -1
        ranks = layer_ranks[module]
        shapes_ok = (a.shape == (num_layers, rank, in_features)
                     and b_t.shape == (num_layers, rank, out_features))
        if (not shapes_ok or a.dtype != dtype or b_t.dtype != dtype or not 0 < rank <= max_rank
                or len(ranks) != num_layers or max(ranks) != rank):
            return None
        # Non-finite values would poison every token of the batch (see lora/adapter.py).
        if not (torch.isfinite(a.sum()) and torch.isfinite(b_t.sum())):
            return None
    try:
        os.utime(file)  # served now: the last entry eviction would pick
    except OSError:
        pass  # a read-only cache still serves
    return modules, layer_ranks

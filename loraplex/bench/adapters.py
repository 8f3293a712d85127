"""Random PEFT-format LoRA adapters for benchmarks (no peft needed at run time)."""

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraplex.lora.modules import MLP_MODULES, TARGET_MODULES
from loraplex.lora.packed import CACHE_ENV
from loraplex.model.model_config import ModelConfig


def write_random_adapter(
    out_dir: Path, config: ModelConfig, rank: int, targets=TARGET_MODULES, seed: int = 0,
    dtype: torch.dtype = torch.float32, b_scale: float = 0.01,
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors with small random A and B (B's
    entries ~ b_scale), stored as `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    shapes = config.module_shapes()
    tensors = {}
    for layer in range(config.num_layers):
        for module in targets:
            d_in, d_out = shapes[module]
            block = "mlp" if module in MLP_MODULES else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            a = torch.randn(rank, d_in, generator=gen) / d_in**0.5
            b = torch.randn(d_out, rank, generator=gen) * b_scale
            tensors[f"{prefix}.lora_A.weight"] = a.to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = b.to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "adapter_model.safetensors")
    (out_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets),
        "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None,
    }))
    return out_dir


@contextmanager
def private_adapter_cache(directory: Path) -> Iterator[None]:
    """Engines made inside (and processes spawned inside) keep the adapters they load under
    `directory`, not in the user's adapter cache: benchmark adapters are temporary."""
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(directory)
    try:
        yield
    finally:
        if previous is None:
            del os.environ[CACHE_ENV]
        else:
            os.environ[CACHE_ENV] = previous

"""Checking an adapter against the base model before the registry accepts a version of it."""

from collections.abc import Callable, Mapping
from pathlib import Path

from loraplex.lora.adapter import load_adapter
from loraplex.model.loader import read_config
from loraplex.model.pull import resolve_model

# Uploads are validated against this rank; the engine's max_lora_rank must be at least as large
# to serve them (the engine refuses larger ones with a clear message at load time).
MAX_UPLOAD_RANK = 256
UPLOAD_NAME = Path("upload")  # how messages name the adapter being pushed: "adapter upload: ..."


def adapter_validator(model: str) -> Callable[[Mapping[str, bytes]], dict]:
    """A `validate` callable for Registry.push_version: loads the adapter's files (in memory)
    exactly as the engine will (shapes, ranks, NaN/Inf, unsupported options) and returns its
    rank and targets."""
    config = read_config(resolve_model(model))

    def validate(files: Mapping[str, bytes]) -> dict:
        weights = load_adapter(UPLOAD_NAME, num_layers=config.num_layers,
                               module_shapes=config.module_shapes(), max_rank=MAX_UPLOAD_RANK,
                               read_files=lambda: files)
        return {"rank": weights.rank, "target_modules": list(weights.target_modules)}

    return validate

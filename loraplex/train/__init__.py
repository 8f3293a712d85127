"""Per-tenant LoRA fine-tuning: a vault dataset in, a registry version out.

The one place transformers' modeling code (and PEFT) runs: the engine serves with loraplex's
own model, and the registry validates each trained adapter exactly as it validates uploads.
"""

from loraplex.train.data import TrainingError
from loraplex.train.trainer import train_adapter

__all__ = ["TrainingError", "train_adapter"]

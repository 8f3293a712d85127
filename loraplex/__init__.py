"""loraplex: one base LLM, many tenants' LoRA adapters."""

from loraplex.llm import LLM, CompletionOutput
from loraplex.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "SamplingParams"]

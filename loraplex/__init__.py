"""loraplex: one base LLM, many tenants' LoRA adapters."""

from loraplex.llm import LLM, CompletionOutput
from loraplex.sampling_params import GrammarSpec, SamplingParams

__all__ = ["LLM", "CompletionOutput", "GrammarSpec", "SamplingParams"]

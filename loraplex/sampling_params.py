"""SamplingParams: how one request's tokens are chosen, validated field by field."""

from dataclasses import dataclass, field


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; the message names the field."""


@dataclass
class SamplingParams:
    temperature: float = 1.0
    """0 means greedy."""
    max_tokens: int = 16
    """Most tokens to generate."""
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the chosen token's logprob plus the top-k alternatives."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end the sequence (besides the model's EOS)."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks)."""

    def __post_init__(self):
        if not isinstance(self.temperature, int | float) or self.temperature < 0:
            raise SamplingParamsError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SamplingParamsError(
                f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"
            )
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise SamplingParamsError(f"logprobs must be None or >= 0, got {self.logprobs!r}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise SamplingParamsError("stop_token_ids must be non-negative integers")

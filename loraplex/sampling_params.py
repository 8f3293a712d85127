"""SamplingParams: how one request's tokens are chosen, validated field by field."""

from dataclasses import dataclass, field
from typing import Literal

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = 1024  # as OpenAI: at most this many token ids in logit_bias
GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_GRAMMAR_BYTES = 32 * 1024  # a schema, regex or grammar larger than this is refused


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; the message names the field."""


def _check(ok: bool, name: str, rule: str, value) -> None:
    if not ok:
        raise SamplingParamsError(f"{name} must be {rule}, got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match (structured outputs). `value`: the JSON schema as JSON text,
    the regex, the JSON list of choices, or a Lark or GBNF grammar; "" for json_object (any
    object)."""

    kind: Literal["json_schema", "json_object", "regex", "choice", "grammar"]
    value: str = ""

    def __post_init__(self):
        _check(self.kind in GRAMMAR_KINDS, "grammar kind", f"one of {', '.join(GRAMMAR_KINDS)}",
               self.kind)
        _check(isinstance(self.value, str), "grammar value", "a string", self.value)
        size = len(self.value.encode())
        _check(size <= MAX_GRAMMAR_BYTES, f"the {self.kind}",
               f"at most {MAX_GRAMMAR_BYTES} bytes", f"{size} bytes")


# Below this a temperature is greedy: dividing logits by, say, 1e-117 overflows them to inf, and
# the softmax of infs is NaN, so the draw picked any token, one the grammar's mask forbids too.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    n: int = 1
    """Independent completions of the same prompt."""
    temperature: float = 1.0
    """0 (or anything below GREEDY_BELOW_TEMPERATURE) means greedy."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability adds up to top_p."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 (or 0) keeps all."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one."""
    seed: int | None = None
    """Same seed, same tokens, whatever else runs in the batch."""
    max_tokens: int = 16
    """Most tokens to generate."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the output; the stop string itself is not returned."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end the sequence (besides the model's EOS)."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks)."""
    repetition_penalty: float = 1.0
    """> 1 discourages any token already in the prompt or output (divides its logit)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """Subtracted once per earlier occurrence of the token in the output."""
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the chosen token's logprob plus the top-k alternatives.
    Always of the model's own distribution (before logit_bias, a grammar or penalties)."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> a number in [-100, 100] added to its logit before sampling."""
    grammar: GrammarSpec | None = None
    """Constrain the output to a grammar (structured outputs)."""

    def __post_init__(self):
        _check(_is_int(self.n) and 1 <= self.n <= 64, "n", "an integer in [1, 64]", self.n)
        _check(_is_number(self.temperature) and 0 <= self.temperature <= 100, "temperature",
               "a number in [0, 100]", self.temperature)
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(_is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 0), "top_k",
               "-1 (off) or a non-negative integer", self.top_k)
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _check(self.seed is None or _is_int(self.seed), "seed", "an integer or null", self.seed)
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
               "an integer >= 1", self.max_tokens)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(isinstance(self.stop, list) and len(self.stop) <= 16
               and all(isinstance(s, str) and s for s in self.stop),
               "stop", "a non-empty string or a list of at most 16 of them", self.stop)
        _check(isinstance(self.stop_token_ids, list)
               and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", "a list of non-negative integers", self.stop_token_ids)
        _check(_is_number(self.repetition_penalty) and 0 < self.repetition_penalty <= 10,
               "repetition_penalty", "in (0, 10]", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2 <= value <= 2, name, "in [-2, 2]", value)
        _check(self.logprobs is None or (_is_int(self.logprobs)
                                         and 0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", f"null or an integer in [0, {MAX_LOGPROBS}]", self.logprobs)
        _check(isinstance(self.logit_bias, dict)
               and len(self.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES
               and all(_is_int(k) and k >= 0 for k in self.logit_bias),
               "logit_bias", f"a map of at most {MAX_LOGIT_BIAS_ENTRIES} token ids to numbers",
               self.logit_bias)
        for token, bias in self.logit_bias.items():
            _check(_is_number(bias) and -100 <= bias <= 100, f"logit_bias[{token}]",
                   "a number in [-100, 100]", bias)
        _check(self.grammar is None or isinstance(self.grammar, GrammarSpec), "grammar",
               "a GrammarSpec or None", self.grammar)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

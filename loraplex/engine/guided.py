"""Structured outputs: a request's grammar (a JSON schema, any JSON object, a regex, a choice of
strings, or a Lark or GBNF grammar) as a per-row token mask, with llguidance.

Why llguidance (against xgrammar, measured on SmolLM2's tokenizer: BENCHMARKS.md, "Structured
outputs"): it compiles a new schema in ~1 ms (xgrammar ~6 ms), its ~30 us masks a row are
nothing next to a step on a CPU (xgrammar's are 3 us), and it needs no triton (1 GB) in a CPU
install; it is what llama.cpp uses.

A compiled grammar is cached per spec (the tokenizer is fixed per compiler); each sequence gets
its own matcher, a copy of the cached one. Compiling runs wherever `compile` is called: the
server calls it on a worker thread before queuing, so the engine thread finds it in the cache.
"""

import json
import threading
from collections import OrderedDict

import llguidance
import llguidance.torch
import torch
from llguidance.gbnf_to_lark import any_to_lark

from loraplex.model.tokenizer import Tokenizer
from loraplex.sampling_params import GrammarSpec

CACHE_SIZE = 256  # compiled grammars kept (least recently used go first)
# Compact JSON: no whitespace between tokens, so a small model cannot run on in newlines.
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A grammar that cannot be compiled; the message says why."""


def _llguidance_grammar(spec: GrammarSpec) -> str:
    if spec.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                             defaults=JSON_OPTIONS)
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.value)
        except json.JSONDecodeError as e:
            raise GrammarError(f"invalid json_schema: not valid JSON: {e}") from None
        if not isinstance(schema, dict | bool):
            raise GrammarError("invalid json_schema: a JSON schema must be an object")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        try:
            choices = json.loads(spec.value)
        except json.JSONDecodeError:
            choices = None
        if not (isinstance(choices, list) and choices
                and all(isinstance(c, str) and c for c in choices)):
            raise GrammarError("invalid choice: a choice must be a non-empty list of non-empty "
                               "strings")
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in choices))
    try:
        lark = any_to_lark(spec.value)  # GBNF (llama.cpp's) is converted; Lark is kept
    except Exception as e:  # the converter raises whatever its parser meets
        raise GrammarError(f"invalid grammar: {e}") from None
    return llguidance.LLMatcher.grammar_from_lark(lark)


class CompiledGrammar:
    """A grammar ready to constrain sequences: `matcher()` gives each one its own state."""

    def __init__(self, template: "llguidance.LLMatcher"):
        self._template = template

    def matcher(self) -> "GrammarMatcher":
        return GrammarMatcher(self._template.deep_copy())


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: "llguidance.LLMatcher"):
        self._matcher = matcher

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of an int32 bitmask [rows, words]."""
        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def consume(self, token_id: int) -> None:
        self._matcher.consume_token(token_id)

    @property
    def is_done(self) -> bool:
        """The grammar is complete (nothing more may follow but end of sequence)."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        """Why the matcher refused a token (it then refuses everything), or None."""
        return self._matcher.get_error() if self._matcher.is_error() else None


class _TokenTable:
    """A tokenizer as llguidance's TokenizerWrapper reads it: each token's bytes and an encode
    function. For tokenizers whose tokenizer.json llguidance cannot read (e.g. a word-level
    vocabulary with a Fuse decoder)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = None
        self.special_token_ids = sorted(tokenizer.special_token_ids())
        special = set(self.special_token_ids)
        self.tokens = [
            b"\xff" + f"<[{i}]>".encode() if i in special  # llguidance's mark of a special
            else tokenizer.decode([i], skip_special_tokens=False).encode()
            for i in range(vocab_size)]
        self._encode = tokenizer.encode

    def __call__(self, text: str) -> list[int]:
        return self._encode(text, add_special_tokens=False)


class GrammarCompiler:
    """Compiles specs against one tokenizer, caching the results. Thread-safe: the server
    compiles on worker threads while the engine thread reads."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self._source = tokenizer
        self.vocab_size = vocab_size  # the logits' width (may exceed the tokenizer's)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiled = 0

    def tokenizer(self) -> "llguidance.LLTokenizer":
        """llguidance's table of the tokenizer, built on first use (a server that never sees
        a grammar never pays for it)."""
        with self._lock:
            if self._tokenizer is None:
                source = self._source
                try:
                    self._tokenizer = llguidance.LLTokenizer(
                        source.to_json(), n_vocab=self.vocab_size, eos_token=source.eos_token_id)
                except ValueError:  # a decoder llguidance does not know: give it the table
                    self._tokenizer = llguidance.LLTokenizer(
                        llguidance.TokenizerWrapper(_TokenTable(source, self.vocab_size)),
                        n_vocab=self.vocab_size)
            return self._tokenizer

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Raises GrammarError naming the problem."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        tokenizer = self.tokenizer()
        try:
            grammar = _llguidance_grammar(spec)
        except GrammarError:
            raise
        except ValueError as e:  # llguidance's own, e.g. a schema that is not an object
            raise GrammarError(f"invalid {spec.kind}: {e}") from None
        # The matcher never raises for a bad grammar: it starts in an error state instead.
        template = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if template.is_error():
            raise GrammarError(f"invalid {spec.kind}: {template.get_error()}")
        compiled = CompiledGrammar(template)
        with self._lock:
            self._cache[spec] = compiled
            self.num_compiled += 1
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set the disallowed tokens' logits to -inf. logits [rows, vocab], bitmask int32
    [rows, words]: bit j of word w allows token 32 * w + j. (llguidance.torch has one too, but
    behind torch.compile: seconds of compiling on a CPU, for an op of microseconds here.)"""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)  # [rows, 32 * words]
    vocab = logits.shape[1]
    if allowed.shape[1] < vocab:
        allowed = torch.cat([allowed, allowed.new_zeros(allowed.shape[0],
                                                        vocab - allowed.shape[1])], dim=1)
    logits.masked_fill_(~allowed[:, :vocab].to(logits.device), float("-inf"))

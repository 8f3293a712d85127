"""Grammars compiled against a real byte-level BPE tokenizer: what compiles, what is refused and
why, the cache, and the mask's bits on the logits."""

import json

import pytest
import torch

from loraplex.engine.guided import GrammarCompiler, GrammarError, apply_bitmask
from loraplex.model.tokenizer import Tokenizer
from loraplex.sampling_params import MAX_GRAMMAR_BYTES, GrammarSpec, SamplingParamsError


@pytest.fixture(scope="module")
def tokenizer(bpe_llama_dir):
    return Tokenizer(bpe_llama_dir)


@pytest.fixture
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, tokenizer.vocab_size + 16)


def walk(compiler, spec: GrammarSpec, text: str, tokenizer) -> bool:
    """Whether `text`'s tokens are each allowed by the mask in turn, ending the grammar."""
    matcher = compiler.compile(spec).matcher()
    for token in tokenizer.encode(text, add_special_tokens=False):
        mask = torch.zeros(1, (compiler.vocab_size + 31) // 32, dtype=torch.int32)
        matcher.fill_mask(mask, 0)
        if not (mask[0, token // 32] >> (token % 32)) & 1:
            return False
        matcher.consume(token)
    return matcher.is_done or matcher.error is None


@pytest.mark.parametrize("spec, good, bad", [
    (GrammarSpec("json_schema", json.dumps({
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
        "additionalProperties": False})), '{"n":42}', '{"m":1}'),
    (GrammarSpec("json_object"), '{"a":[1,2]}', "[1]"),
    (GrammarSpec("regex", r"\d{3}-[a-z]+"), "123-abc", "12-abc"),
    (GrammarSpec("choice", json.dumps(["Paris", "London"])), "Paris", "Rome"),
    (GrammarSpec("grammar", 'start: "yes" | "no"'), "no", "maybe"),  # Lark
    (GrammarSpec("grammar", 'root ::= "yes" | "no"'), "yes", "maybe"),  # GBNF
])
def test_the_mask_allows_what_matches_and_nothing_else(compiler, tokenizer, spec, good, bad):
    assert walk(compiler, spec, good, tokenizer)
    assert not walk(compiler, spec, bad, tokenizer)


@pytest.mark.parametrize("spec, words", [
    (GrammarSpec("json_schema", "{not json"), "not valid JSON"),
    (GrammarSpec("json_schema", "[1, 2]"), "must be an object"),
    (GrammarSpec("json_schema", json.dumps({"type": "object", "minProperties": "x"})),
     "json_schema"),
    (GrammarSpec("regex", "(unclosed"), "regex"),
    (GrammarSpec("choice", "[]"), "non-empty list"),
    (GrammarSpec("grammar", "start: undefined_rule"), "grammar"),
])
def test_a_grammar_that_cannot_compile_says_why(compiler, spec, words):
    with pytest.raises(GrammarError, match=words):
        compiler.compile(spec)
    assert compiler.num_compiled == 0


def test_a_spec_over_the_size_limit_is_refused_before_compiling():
    with pytest.raises(SamplingParamsError, match=f"at most {MAX_GRAMMAR_BYTES} bytes"):
        GrammarSpec("regex", "a" * (MAX_GRAMMAR_BYTES + 1))
    with pytest.raises(SamplingParamsError, match="grammar kind"):
        GrammarSpec("xml", "")


def test_a_spec_compiles_once_and_each_sequence_gets_its_own_state(compiler, tokenizer):
    spec = GrammarSpec("regex", "ab|ac")
    first, second = compiler.compile(spec), compiler.compile(GrammarSpec("regex", "ab|ac"))
    assert first is second and compiler.num_compiled == 1
    a, b = first.matcher(), first.matcher()
    a.consume(tokenizer.encode("a", add_special_tokens=False)[0])
    mask_a = torch.zeros(1, (compiler.vocab_size + 31) // 32, dtype=torch.int32)
    mask_b = mask_a.clone()
    a.fill_mask(mask_a, 0)
    b.fill_mask(mask_b, 0)
    assert not torch.equal(mask_a, mask_b), "one sequence's progress moved another's"


def test_apply_bitmask_keeps_exactly_the_set_bits():
    vocab = 70  # not a multiple of 32: the tail past the mask's words is disallowed
    logits = torch.randn(2, vocab)
    allowed = [{0, 31, 33, 63}, {5, 64, 65}]
    mask = torch.zeros(2, 3, dtype=torch.int32)
    for row, tokens in enumerate(allowed):
        for t in tokens:
            word = int(mask[row, t // 32]) | (1 << (t % 32))
            mask[row, t // 32] = word - (1 << 32) if word >= 1 << 31 else word  # int32 bits
    expected = logits.clone()
    for row, tokens in enumerate(allowed):
        for t in range(vocab):
            if t not in tokens:
                expected[row, t] = float("-inf")
    apply_bitmask(logits, mask)
    assert torch.equal(logits, expected)

"""Grammars and logit_bias in the engine (sampler.py and llm_engine.py together): each row of a
batch follows its own constraint, a mixed batch (schemas, regexes, free text, different
adapters) gives each request the tokens it gets alone, and logprobs stay those of the model."""

import json
import re

import jsonschema
import pytest

from loraplex import LLM, GrammarSpec, SamplingParams

SCHEMA = {"type": "object", "properties": {
    "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "ok": {"type": "boolean"},
    "tag": {"enum": ["red", "green"]},
    "items": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
}, "required": ["n", "ok", "tag", "items"], "additionalProperties": False}
REGEX = r"[A-Z]{2}-\d{3}"


@pytest.fixture(scope="module")
def llm(sharp_llama_dir):
    return LLM(str(sharp_llama_dir), max_loras=4, max_lora_rank=16, max_model_len=256,
               kv_cache_bytes=1 << 24)


def requests(sharp_adapters):
    """(prompt, params, adapter): constrained and free rows, on the base and on adapters."""
    greedy = dict(temperature=0, max_tokens=60)
    return [
        ("Give me JSON", SamplingParams(**greedy, grammar=GrammarSpec(
            "json_schema", json.dumps(SCHEMA))), sharp_adapters[0]),
        ("Free text please", SamplingParams(temperature=0, max_tokens=12), None),
        ("A code", SamplingParams(**greedy, grammar=GrammarSpec("regex", REGEX)),
         sharp_adapters[1]),
        ("Pick one", SamplingParams(**greedy, grammar=GrammarSpec(
            "choice", json.dumps(["alpha", "beta", "gamma"]))), None),
        ("Any object", SamplingParams(**greedy, grammar=GrammarSpec("json_object")),
         sharp_adapters[2]),
        ("More free text", SamplingParams(temperature=0, max_tokens=12), sharp_adapters[0]),
    ]


def test_every_row_follows_its_own_grammar(llm, sharp_adapters):
    reqs = requests(sharp_adapters)
    outs = [llm.generate(p, params, adapters=[a])[0] for p, params, a in reqs]
    jsonschema.validate(json.loads(outs[0].text), SCHEMA)
    assert re.fullmatch(REGEX, outs[2].text)
    assert outs[3].text in ("alpha", "beta", "gamma")
    assert isinstance(json.loads(outs[4].text), dict)
    for out, (_, params, _) in zip(outs, reqs, strict=True):
        if params.grammar is not None:
            assert out.finish_reason == "stop", out.text  # the grammar completed


def test_a_mixed_batch_gives_each_request_the_tokens_it_gets_alone(llm, sharp_adapters):
    reqs = requests(sharp_adapters)
    alone = [llm.generate(p, params, adapters=[a])[0].token_ids for p, params, a in reqs]
    together = llm.generate([p for p, _, _ in reqs], [params for _, params, _ in reqs],
                            adapters=[a for _, _, a in reqs])
    assert [out.token_ids for out in together] == alone


def test_a_grammar_changes_the_choice_but_not_the_reported_logprobs(llm):
    free = llm.generate("x", SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0]
    forced = llm.generate("x", SamplingParams(temperature=0, max_tokens=4, logprobs=3,
                                              grammar=GrammarSpec("regex", "zzzz")))[0]
    assert forced.text == "zzzz"
    # Logprobs are the model's own (as OpenAI's): the first step saw the same logits.
    assert forced.top_logprobs[0] == pytest.approx(free.top_logprobs[0])


def test_logit_bias_bans_and_forces_tokens_and_leaves_logprobs_alone(llm):
    params = dict(temperature=0, max_tokens=6, logprobs=1)
    free = llm.generate("hello", SamplingParams(**params))[0]
    banned = free.token_ids[0]
    without = llm.generate("hello", SamplingParams(**params, logit_bias={banned: -100}))[0]
    assert banned not in without.token_ids
    assert without.logprobs[0] < free.logprobs[0]  # what it chose instead was less likely
    forced_id = llm.tokenizer.encode("Q", add_special_tokens=False)[0]
    forced = llm.generate("hello", SamplingParams(**params, logit_bias={forced_id: 100}))[0]
    assert forced.token_ids == [forced_id] * 6


def test_bad_grammars_and_biases_are_refused_with_the_reason(llm):
    with pytest.raises(ValueError, match="regex"):
        llm.generate("x", SamplingParams(grammar=GrammarSpec("regex", "(")))
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate("x", SamplingParams(logit_bias={10**6: 1.0}))
    with pytest.raises(ValueError, match=r"logit_bias\[3\]"):
        SamplingParams(logit_bias={3: 101})

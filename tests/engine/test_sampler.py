"""Sampling per request: each parameter does what it says, seeds ignore the rest of the batch."""

import math

import pytest
import torch

from loraplex.engine.sampler import _filtered_probs, apply_penalties, sample
from loraplex.engine.sequence import Sequence
from loraplex.sampling_params import SamplingParams
from tests.engine.test_llm_engine import make_engine, prompts, run


def seq(params: SamplingParams, prompt=(1, 2), output=(), seed=None) -> Sequence:
    s = Sequence("r", 0, list(prompt), params, None, arrival=0,
                 generator=None if seed is None else torch.Generator().manual_seed(seed))
    s.output_token_ids = list(output)
    return s


def test_top_k_top_p_min_p_keep_exactly_the_intended_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    def kept(**kw):
        probs = _filtered_probs(logits.clone(), [seq(SamplingParams(temperature=1.0, **kw))])
        return (probs[0] > 0).tolist()
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7, 0.75 >= 0.7 stops after
    assert kept(top_p=0.5) == [True, False, False, False]
    assert kept(min_p=0.4) == [True, True, False, False]  # >= 0.4 * 0.5
    assert kept() == [True, True, True, True]


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    cold = _filtered_probs(logits, [seq(SamplingParams(temperature=0.5))])[0]
    hot = _filtered_probs(logits, [seq(SamplingParams(temperature=2.0))])[0]
    assert cold[0] > torch.softmax(logits, -1)[0, 0] > hot[0]


def test_penalties_follow_their_definitions():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits.clone(), [seq(p, prompt=[1], output=[2, 2])])[0]
    # token 0 unseen: unchanged; token 1 (prompt, negative): * 2; token 2 (output twice,
    # positive): / 2, then - 0.5 presence - 2 * 0.25 frequency; token 3 unseen: unchanged.
    assert out.tolist() == [2.0, -4.0, 1.0 / 2 - 0.5 - 0.5, 0.5]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(4000, 1)
    seqs = [seq(SamplingParams(temperature=1.0)) for _ in range(4000)]
    tokens = [t.token_id for t in sample(logits, seqs, torch.Generator().manual_seed(0))]
    freq = [tokens.count(i) / 4000 for i in range(3)]
    assert all(abs(f - p) < 0.03 for f, p in zip(freq, [0.7, 0.2, 0.1], strict=True))


@pytest.mark.parametrize("temperature", [5.6e-117, 1e-30, 1e-6])
def test_a_temperature_too_small_to_divide_by_is_greedy(temperature):
    """logits / 5.6e-117 overflow to inf and their softmax is NaN: the draw took any token (the
    fuzzer found one a JSON grammar's mask had forbidden). Such a temperature means greedy."""
    logits = torch.tensor([[-3.0, 4.0, -float("inf"), 1.0]] * 64)
    seqs = [seq(SamplingParams(temperature=temperature), seed=i) for i in range(64)]
    assert all(s.params.is_greedy for s in seqs)
    assert {t.token_id for t in sample(logits, seqs, torch.Generator())} == {1}


def test_logprobs_are_the_models_with_sorted_top_alternatives():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    [tok] = sample(logits, [seq(SamplingParams(temperature=0, logprobs=3))], torch.Generator())
    full = torch.log_softmax(logits, -1)[0]
    assert tok.token_id == 0 and math.isclose(tok.logprob, full[0].item(), rel_tol=1e-6)
    assert list(tok.top_logprobs) == [0, 2, 1]
    assert math.isclose(tok.top_logprobs[2], full[2].item(), rel_tol=1e-6)


def test_seed_gives_the_same_tokens_whatever_else_is_in_the_batch(sharp_llama_dir):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    other = SamplingParams(temperature=1.5, max_tokens=16, ignore_eos=True)
    engine = make_engine(sharp_llama_dir)
    alone = run(engine, [(prompts(3)[1], None)], seeded)[("r0", 0)].token_ids
    engine.add_request("x", prompts(3)[0], other)
    engine.add_request("y", prompts(3)[2], other)
    together = run(engine, [(prompts(3)[1], None)], seeded)[("r0", 0)].token_ids
    assert together == alone
    different_seed = SamplingParams(**{**seeded.__dict__, "seed": 99})
    assert run(engine, [(prompts(3)[1], None)], different_seed)[("r0", 0)].token_ids != alone


def test_n_completions_differ_and_top_k_1_is_greedy(sharp_llama_dir):
    engine = make_engine(sharp_llama_dir)
    many = run(engine, [(prompts(3)[1], None)],
               SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True))
    outs = [many[("r0", i)].token_ids for i in range(3)]
    assert len(outs) == 3 and len({tuple(o) for o in outs}) > 1
    greedy = run(engine, [(prompts(3)[1], None)],
                 SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    top1 = run(engine, [(prompts(3)[1], None)],
               SamplingParams(temperature=1.0, top_k=1, max_tokens=12, ignore_eos=True))
    assert greedy[("r0", 0)].token_ids == top1[("r0", 0)].token_ids


def test_stop_strings_end_the_output_and_are_not_emitted(sharp_llama_dir):
    engine = make_engine(sharp_llama_dir)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = run(engine, [(prompts(3)[1], None)], params)[("r0", 0)]
    stop = full.text[5:7]  # a string the model will produce
    first = full.text.find(stop)
    cut = run(engine, [(prompts(3)[1], None)], SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))[("r0", 0)]
    assert cut.finish_reason == "stop" and cut.text == full.text[:first]
    token = full.token_ids[3]
    by_id = run(engine, [(prompts(3)[1], None)], SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[token]))[("r0", 0)]
    assert by_id.finish_reason == "stop"
    assert by_id.token_ids == full.token_ids[: full.token_ids.index(token) + 1]


@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("top_p", 0), ("top_k", -5), ("min_p", 2), ("max_tokens", 0),
    ("n", 0), ("seed", "x"), ("stop", [""]), ("stop_token_ids", [-1]),
    ("repetition_penalty", 0), ("presence_penalty", 3), ("frequency_penalty", -3),
    ("logprobs", 21),
])
def test_invalid_parameters_name_the_field(field, value):
    from loraplex.sampling_params import SamplingParamsError

    with pytest.raises(SamplingParamsError, match=f"^{field} must be"):
        SamplingParams(**{field: value})

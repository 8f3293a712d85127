"""python -m loraplex.bench.fair_share on the tiny model, and its usage errors."""

import pytest

from loraplex.bench import fair_share
from tests.bench.usage import usage_error


@pytest.mark.parametrize("weights", [(1.0, 1.0), (2.0, 1.0)])
def test_two_backlogged_tenants_share_by_their_weights(tiny_llama_dir, weights):
    result = fair_share.run(str(tiny_llama_dir), weights, num_requests=24, prompt_len=8,
                            output_len=8, dtype="float32", max_num_seqs=4)
    assert result["steps"] > 20
    assert result["ratio"] == pytest.approx(weights[0] / weights[1], rel=0.15)
    assert result["max_window_gap"] <= result["bound"]


@pytest.mark.parametrize("args, message", [(["--weights", "2"], "two positive"),
                                           (["--weights", "a,b"], "two numbers"),
                                           (["--requests", "0"], "at least 1")])
def test_bad_options_are_a_usage_error_not_a_traceback(args, message, monkeypatch, capsys):
    assert message in usage_error(fair_share.main, ["fair_share", *args], monkeypatch, capsys)

"""python -m loraplex.bench.lora_share: runs end to end, times the LoRA op only where it runs."""

import re
import sys

import pytest

from loraplex.bench import lora_share
from loraplex.model import llama
from tests.bench.usage import usage_error


@pytest.mark.parametrize("lora_dtype", ["auto", "int8"])
def test_lora_share_reports_every_run_and_restores_the_op(lora_dtype, tiny_llama_dir, monkeypatch,
                                                          capsys):
    real_op = llama.add_lora
    monkeypatch.setattr(sys, "argv", [
        "lora_share", "--model", str(tiny_llama_dir), "--dtype", "float32", "--repeats", "1",
        "--num-adapters", "3", "--num-requests", "4", "--concurrency", "2",
        "--prompt-len", "4-40", "--output-len", "2-6", "--lora-dtype", lora_dtype])
    lora_share.main()
    out = capsys.readouterr().out
    assert f"lora_dtype {lora_dtype}," in out
    for name in ("with adapters", "LoRA op skipped", "no adapters"):
        assert re.search(rf"{name}: [\d.]+ \([\d.]+x; rounds [\d.]+\)", out)
    prefill, decode = map(float, re.search(
        r"([\d.]+) ms in prefill steps, ([\d.]+) ms in decode steps", out).groups())
    assert prefill > 0 and decode > 0  # 4 requests with adapters prefill, then decode
    assert llama.add_lora is real_op


def test_a_skipped_op_returns_y_untouched_and_its_time_goes_to_its_kind_of_step():
    seconds = {"prefill": 0.0, "decode": 0.0}

    class Engine:  # the three things lora_op_timed touches
        scheduler = type("S", (), {"waiting": [], "running": []})()
        runner = type("R", (), {"use_layers_kernel": True, "layers_kernel": "built"})()

        def step(self):
            return llama.add_lora("y", "x", None, None, None)

    engine = Engine()
    with lora_share.lora_op_timed(engine, seconds, skip=True):
        assert engine.step() == "y"  # skipped: y comes back unchanged
        assert not engine.runner.use_layers_kernel  # decode steps layer by layer meanwhile
    assert (engine.runner.use_layers_kernel, engine.runner.layers_kernel) == (True, "built")
    assert seconds["decode"] > 0 and seconds["prefill"] == 0  # nothing waiting or prefilling


@pytest.mark.parametrize("args, message", [
    (["--prompt-len", "abc"], "--prompt-len should look like 16-256"),
    (["--output-len", "9-3"], "--output-len must be 1 <= low <= high"),
    (["--repeats", "0"], "--repeats: should be a whole number of at least 1, got '0'"),
    (["--lora-dtype", "int4"], "invalid choice: 'int4'"),
    (["--model", "/nonexistent"], "is neither a known model nor an existing directory"),
])
def test_bad_options_are_a_usage_error_not_a_traceback(args, message, monkeypatch, capsys):
    assert message in usage_error(lora_share.main, ["lora_share", *args], monkeypatch, capsys)

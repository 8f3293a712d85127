"""python -m loraplex.bench.kernels: runs end to end and reports every figure it promises."""

import re
import shutil
import sys

import pytest

from loraplex.bench import kernels
from tests.bench.usage import usage_error


@pytest.mark.skipif(not shutil.which("c++") and not shutil.which("g++"), reason="no compiler")
@pytest.mark.parametrize("lora_dtype, weights", [("auto", "weights in the same dtype"),
                                                 ("int8", "int8 weights")])
def test_kernel_benchmark_reports_lora_and_attention(lora_dtype, weights, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["kernels", "--slots", "2", "--repeats", "1",
                                      "--dtype", "float32", "--lora-dtype", lora_dtype])
    kernels.main()
    out = capsys.readouterr().out
    assert f"LoRA, float32, {weights}, 30 layers" in out
    assert re.search(r"decode step of 2 adapters [\d.]+ ms \([\d.]+ GB/s\)", out)
    assert len(re.findall(r"prefill run of \d+ tokens on one slot: [\d.]+ ms", out)) == 3
    assert re.search(r"decode attention, 32 sequences \(\d+ cached tokens\), 30 layers", out)


@pytest.mark.skipif(not shutil.which("c++") and not shutil.which("g++"), reason="no compiler")
def test_both_weight_dtypes_in_one_run(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["kernels", "--slots", "2", "--repeats", "2",
                                      "--dtype", "float32", "--lora-dtype", "auto,int8"])
    kernels.main()
    out = capsys.readouterr().out
    for weights in ("weights in the same dtype", "int8 weights"):
        assert re.search(rf"LoRA, float32, {weights}, 30 layers: decode step of 2 adapters "
                         r"[\d.]+ ms", out)
    assert len(re.findall(r"prefill run of \d+ tokens on one slot: [\d.]+ ms", out)) == 6


def test_alternating_medians_take_each_functions_own_times():
    calls = []
    medians = kernels.alternating_medians([lambda: calls.append("a"), lambda: calls.append("b")],
                                          3)
    assert calls == ["a", "b"] * 4 and len(medians) == 2  # a warm-up, then 3 rounds in turn


@pytest.mark.parametrize("args, message", [
    (["--slots", "0"], "--slots: should be a whole number of at least 1, got '0'"),
    (["--lora-dtype", "int4"], "should be a comma list of auto, int8, got 'int4'"),
])
def test_bad_options_are_a_usage_error(args, message, monkeypatch, capsys):
    assert message in usage_error(kernels.main, ["kernels", *args], monkeypatch, capsys)

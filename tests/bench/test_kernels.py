"""python -m loraplex.bench.kernels: runs end to end and reports every figure it promises."""

import re
import shutil
import sys

import pytest

from loraplex.bench import kernels


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


def test_a_count_below_one_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["kernels", "--slots", "0"])
    with pytest.raises(SystemExit) as exit_info:
        kernels.main()
    assert exit_info.value.code == 2
    assert "--slots: should be a whole number of at least 1, got '0'" in capsys.readouterr().err

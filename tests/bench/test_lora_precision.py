"""python -m loraplex.bench.lora_precision: runs end to end, compares against float32."""

import re
import sys

import pytest

from loraplex.bench import lora_precision
from tests.bench.usage import usage_error


def test_precision_report_compares_both_bf16_variants_with_float32(
        sharp_llama_dir, sharp_adapters, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lora_precision", *map(str, sharp_adapters[:2]),
                                      "--model", str(sharp_llama_dir), "--max-tokens", "6"])
    lora_precision.main()
    out = capsys.readouterr().out
    assert f"2 adapters x {len(lora_precision.PROMPTS)} prompts, 6 greedy tokens" in out
    for name in ("bf16 weights", "int8 weights"):
        found = re.search(rf"{name}: all 6 tokens equal in (\d+) of (\d+) answers; tokens before "
                          r"the first difference median \d+, min \d+; largest log-prob "
                          r"difference over shared tokens median [\d.]+, max [\d.]+", out)
        assert found and int(found[2]) == 2 * len(lora_precision.PROMPTS)


def test_agreement_counts_tokens_up_to_the_first_difference():
    class Answer:
        def __init__(self, token_ids, logprobs):
            self.token_ids, self.logprobs = token_ids, logprobs

    reference = Answer([1, 2, 3, 4], [-0.1, -0.2, -0.3, -0.4])
    assert lora_precision.agreement(Answer([1, 2, 9, 4], [-0.1, -0.5, -2.0, -0.4]),
                                    reference) == (2, pytest.approx(0.3))
    assert lora_precision.agreement(reference, reference) == (4, 0.0)
    assert lora_precision.agreement(Answer([7, 2, 3, 4], [-1.0] * 4), reference) == (0, 0.0)


def test_a_broken_adapter_is_a_usage_error(sharp_llama_dir, tmp_path, monkeypatch, capsys):
    argv = ["lora_precision", str(tmp_path), "--model", str(sharp_llama_dir)]
    assert "adapter_config.json" in usage_error(lora_precision.main, argv, monkeypatch, capsys)

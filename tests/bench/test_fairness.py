"""python -m loraplex.bench.fairness: its summaries and usage errors (the run itself needs the
default model and minutes: a command, not a test)."""

import pytest

from loraplex.bench import fairness
from tests.bench.usage import usage_error


def test_the_summary_reads_percentiles_of_ttft_and_e2e():
    results = [(0.1 * i, 1.0 * i) for i in range(1, 11)]
    summary = fairness._summary(results)
    assert summary["ttft_p50"] == pytest.approx(0.55)
    assert summary["e2e_p90"] == pytest.approx(9.1)
    assert fairness._summary([(0.2, 3.0)])["e2e_p50"] == 3.0


@pytest.mark.parametrize("args", [["--schedulers", "lottery"], ["--busy", "0"],
                                  ["--rounds", "0"]])
def test_bad_options_are_a_usage_error_not_a_traceback(args, monkeypatch, capsys):
    assert "at least 1" in usage_error(fairness.main, ["fairness", *args], monkeypatch, capsys)


@pytest.mark.parametrize("value", ["-1", "2000", "nan"])
def test_a_return_window_the_engine_refuses_is_a_usage_error(value, monkeypatch, capsys):
    error = usage_error(fairness.main, ["fairness", "--return-window-ms", value], monkeypatch,
                        capsys)
    assert "--return-window-ms: return_window_ms must be a number of milliseconds" in error

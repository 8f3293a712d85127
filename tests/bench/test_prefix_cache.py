"""python -m loraplex.bench.prefix_cache on the tiny model, and its usage errors."""

import pytest

from loraplex.bench import prefix_cache
from tests.bench.usage import usage_error


def test_both_settings_time_both_turns(tiny_llama_dir):
    result = prefix_cache.run(str(tiny_llama_dir), history=60, answer=8, message=5, rounds=1,
                              dtype="float32")
    assert set(result) == {"on", "off"}
    assert all(t > 0 for r in result.values() for t in r.values())


def test_the_table_and_the_target_line(tiny_llama_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["prefix_cache", "--model", str(tiny_llama_dir),
                                     "--history", "40", "--answer", "4", "--rounds", "1"])
    prefix_cache.main()
    out = capsys.readouterr().out
    assert "turn 2 / turn 1" in out and "target: turn 2 <= 0.3x" in out


@pytest.mark.parametrize("args", [["--rounds", "0"], ["--history", "8"], ["--answer", "0"],
                                  ["--threads", "0"]])
def test_bad_counts_are_a_usage_error_not_a_traceback(args, monkeypatch, capsys):
    assert "at least" in usage_error(prefix_cache.main, ["prefix_cache", *args], monkeypatch,
                                     capsys)

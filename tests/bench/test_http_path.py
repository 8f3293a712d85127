"""python -m loraplex.bench.http_path with its own light client, on the tiny model."""

import json
import sys

import pytest

from loraplex.bench import http_path
from loraplex.faults.tiny_model import write_tiny_model


def test_the_light_client_and_the_engine_in_process_get_the_same_requests(tmp_path, monkeypatch,
                                                                          capsys):
    model = write_tiny_model(tmp_path / "model")
    monkeypatch.setattr(sys, "argv", [
        "http_path", "--client", "light", "--model", str(model), "--concurrency", "1,2",
        "--requests", "2,4", "--prompt-tokens", "8", "--output-tokens", "4", "--rounds", "1"])
    http_path.main()
    rounds = [json.loads(line) for line in capsys.readouterr().out.splitlines()
              if line.startswith("{")]
    assert sorted(r["path"] for r in rounds) == ["http", "in-process"]
    for result in rounds:
        for level, requests in (("1", 2), ("2", 4)):
            # Every request answered its 4 tokens (ignore_eos), and each had a first token.
            assert result[level]["output_tokens"] == 4 * requests
            assert result[level]["output_tok_s"] > 0 and result[level]["ttft_p50"] > 0


def test_llama_cpp_runs_the_one_client_level_beside_them(tmp_path, monkeypatch, capsys):
    model = write_tiny_model(tmp_path / "model")
    monkeypatch.setattr(sys, "argv", [
        "http_path", "--client", "light", "--model", str(model), "--concurrency", "1",
        "--requests", "2", "--prompt-tokens", "8", "--output-tokens", "4", "--rounds", "1",
        "--llama-cpp"])
    http_path.main()
    out = capsys.readouterr().out
    rounds = {r["path"]: r for r in (json.loads(line) for line in out.splitlines()
                                     if line.startswith("{"))}
    assert sorted(rounds) == ["http", "in-process", "llama.cpp"]
    assert rounds["llama.cpp"]["1"]["output_tokens"] == 4 * 2
    assert rounds["llama.cpp"]["1"]["ttft_p50"] > 0
    assert "HTTP / llama.cpp" in out


def test_llama_cpp_needs_the_one_client_level(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["http_path", "--concurrency", "8", "--requests", "8",
                                      "--llama-cpp"])
    with pytest.raises(SystemExit):
        http_path.main()

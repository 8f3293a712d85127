"""python -m loraplex.bench.http_path with its own light client, on the tiny model."""

import itertools
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


def test_each_level_and_the_warm_up_get_prompts_of_their_own(tmp_path):
    """A level repeating another's prompts would find them in the prefix cache."""
    from loraplex.model.tokenizer import Tokenizer

    tokenizer = Tokenizer(write_tiny_model(tmp_path / "model"))
    texts = {streams: http_path._texts(tokenizer, 4, 8, http_path._seed(0, streams))
             for streams in (0, 1, 8)}
    assert len({t for level in texts.values() for t in level}) == 12
    assert http_path._texts(tokenizer, 4, 8, http_path._seed(0, 8)) == texts[8]  # paths agree


class _InstantEngine:
    """Answers every request with one token at once, noting when each was sent."""

    def __init__(self):
        self.sent = []

    async def generate(self, prompt, params, adapter, fairness_key):
        import time
        from types import SimpleNamespace

        self.sent.append(time.perf_counter())
        yield SimpleNamespace(error=None, token_ids=[1])


@pytest.mark.parametrize("reaction_ms", [0, 80])
def test_in_process_clients_wait_their_reaction_time_between_requests(reaction_ms):
    import asyncio

    engine = _InstantEngine()
    result = asyncio.run(http_path._in_process(engine, None, [[1]] * 3, 1, 1, reaction_ms / 1e3))
    assert result["output_tokens"] == 3
    gaps = [b - a for a, b in itertools.pairwise(engine.sent)]
    assert all(gap >= reaction_ms / 1e3 for gap in gaps)
    if reaction_ms == 0:
        assert max(gaps) < 0.05


def test_guidellm_gets_a_seed_per_level(tmp_path, monkeypatch):
    """GuideLLM's synthetic prompts are the same for every run unless it is given a seed."""
    commands = []

    def run(command, **_):
        commands.append(command)
        out = command[command.index("--output") + 1].split("path=", 1)[1]
        done = [{"request_start_time": 0.0, "request_end_time": 1.0, "output_tokens": 4}]
        (tmp_path / out.rsplit("/", 1)[1]).write_text(json.dumps({"benchmarks": [{
            "requests": {"errored": [], "successful": done},
            "metrics": {"time_to_first_token_ms": {"successful": {"percentiles": {
                "p50": 10.0}}}}}]}))

    monkeypatch.setattr(http_path.subprocess, "run", run)
    for seed in (1001, 1008):
        result = http_path._guidellm("guidellm", "http://x", "key", tmp_path, 8, 8, 16, 4,
                                     tmp_path / f"c{seed}.json", seed)
        assert result == {"output_tok_s": 4.0, "ttft_p50": 0.01, "output_tokens": 4}
    seeds = [c[c.index("--seed") + 1] for c in commands]
    assert seeds == ["kind=static,value=1001", "kind=static,value=1008"]


@pytest.mark.parametrize("flag, value, message", [
    ("--reaction-ms", "-5", "--reaction-ms must be 0 or more"),
    ("--return-window-ms", "-1", "--return-window-ms: return_window_ms must be a number"),
])
def test_bad_timings_are_refused_before_anything_starts(monkeypatch, capsys, flag, value,
                                                       message):
    monkeypatch.setattr(sys, "argv", ["http_path", flag, value])
    with pytest.raises(SystemExit):
        http_path.main()
    assert message in capsys.readouterr().err

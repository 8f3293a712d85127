"""`loraplex bench` end to end on a tiny model, and its one-line errors."""

import json

import pytest
from typer.testing import CliRunner

from loraplex.bench.cli import parse_int_list, parse_range
from loraplex.cli import app

runner = CliRunner()
SMALL = ["--num-requests", "6", "--concurrency", "3", "--prompt-len", "3-10",
         "--output-len", "2-5", "--rank", "4"]


def test_bench_end_to_end(tiny_llama_dir, tmp_path):
    out = tmp_path / "results"
    result = runner.invoke(app, ["bench", "--model", str(tiny_llama_dir), "--systems",
                                 "loraplex,loraplex-base", "--num-adapters", "1,2",
                                 "--repeats", "2", "--out", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    assert "| loraplex | 1 |" in result.output and "| loraplex, no adapters | 2 |" in result.output
    assert f"wrote {out / 'results.json'}" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "results.json", "results.md", "throughput_vs_adapters.png", "ttft_cdf.png"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["repeats"] == 2 and [p["spec"]["num_adapters"] for p in saved["points"]] == [1, 2]
    for point in saved["points"]:
        for name in ("loraplex", "loraplex, no adapters"):
            runs = point["systems"][name]["repeats"]
            # Every request generated exactly its tokens: nothing failed, nothing stopped early.
            assert [r["errors"] for r in runs] == [0, 0]
            assert len({r["output_tokens"] for r in runs}) == 1
    assert saved["points"][1]["spec"]["prompt_len"] == [3, 10]


@pytest.mark.parametrize("args, message", [
    (["--systems", "loraplex,vllm"], "unknown system 'vllm'"),
    (["--prompt-len", "10-5"], "--prompt-len must be 1 <= low <= high"),
    (["--output-len", "abc"], "--output-len should look like 16-256"),
    (["--num-adapters", "1,x"], "--num-adapters should be a comma list"),
    (["--popularity", "pareto"], "popularity must be one of"),
    (["--arrival", "poisson", "--rate", "0"], "rate must be positive"),
    (["--dtype", "int8"], "--dtype must be one of"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--targets", "q_proj,nope"], "nope"),
])
def test_bad_options_are_one_red_line(args, message, tiny_llama_dir, tmp_path):
    result = runner.invoke(app, ["bench", "--model", str(tiny_llama_dir), "--out",
                                 str(tmp_path), *args])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not any(tmp_path.iterdir())  # nothing ran, nothing was written


def test_unknown_model_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["bench", "--model", str(tmp_path / "nope"), *SMALL])
    assert result.exit_code == 1 and "known models" in result.output


def test_parsers():
    assert parse_range("x", "16-256") == (16, 256) and parse_range("x", "7") == (7, 7)
    assert parse_int_list("x", "1, 8,32") == [1, 8, 32]
    with pytest.raises(ValueError, match="empty"):
        parse_int_list("x", ",")

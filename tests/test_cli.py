"""The command line: clear errors, no tracebacks; generate on a tiny model."""

import pytest
from typer.testing import CliRunner

from loraplex.cli import app

runner = CliRunner()


def test_generate_on_tiny_model(tiny_llama_dir):
    result = runner.invoke(app, ["generate", "--model", str(tiny_llama_dir), "--max-tokens", "5",
                                 "hi"])
    assert result.exit_code == 0, result.output
    assert result.output.strip()  # some text came back


def test_generate_with_broken_adapter_is_a_clear_error(tiny_llama_dir, tmp_path):
    result = runner.invoke(app, ["generate", "--model", str(tiny_llama_dir), "--adapter",
                                 str(tmp_path), "hi"])
    assert result.exit_code == 1
    assert "adapter_config.json" in result.output and "Traceback" not in result.output


def test_unknown_model_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["generate", "--model", str(tmp_path / "nope"), "hi"])
    assert result.exit_code == 1
    assert "known models" in result.output and "Traceback" not in result.output


def test_pull_unknown_name():
    result = runner.invoke(app, ["pull", "gpt-9"])
    assert result.exit_code == 1 and "known models" in result.output


@pytest.mark.real_model
def test_pull_then_generate_answers_paris():
    result = runner.invoke(app, ["pull", "smollm2-135m"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["generate", "--model", "smollm2-135m", "--max-tokens", "24",
                                 "What is the capital of France?"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output

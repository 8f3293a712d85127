"""`loraplex data add/list/rm`: exit codes, messages, no tracebacks."""

import pytest
from typer.testing import CliRunner

from loraplex.registry import Registry
from loraplex.vault.crypto import MASTER_KEY_ENV
from tests.vault.conftest import CHAT

runner = CliRunner()


@pytest.fixture
def cli(home, monkeypatch):
    """cli(*args) -> (exit code, output) of `loraplex data ...` on the fixture's home."""
    from loraplex.cli import app

    monkeypatch.setenv("LORAPLEX_HOME", str(home))

    def cli(*args):
        result = runner.invoke(app, ["data", *map(str, args)])
        assert "Traceback" not in result.output
        return result.exit_code, result.output

    return cli


def test_add_list_rm(cli, home, tmp_path):
    source = tmp_path / "faq.jsonl"
    source.write_bytes(CHAT)
    code, out = cli("add", "acme", "faq", source)
    assert code == 0 and out.startswith("acme/faq v1: 2 records, sha256 "), out
    code, out = cli("add", "acme", "faq", source)
    assert code == 0 and "acme/faq v2" in out
    code, out = cli("list", "acme")
    assert code == 0 and "faq" in out and "v1" in out and "v2" in out
    code, out = cli("rm", "acme", "faq")
    assert (code, out.strip()) == (0, "acme/faq deleted (v1, v2)")
    code, out = cli("list", "acme")
    assert code == 0 and "faq" not in out
    with Registry(home) as registry:
        entries = registry.audit_log(tenant="acme", limit=3)
    assert [e.action for e in entries] == ["data.rm", "data.add", "data.add"]
    assert all(e.actor.startswith("cli:") for e in entries)


def test_errors_exit_1_with_a_clear_message(cli, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n')
    code, out = cli("add", "acme", "faq", bad)
    assert code == 1 and "line 1: a prompt/completion record is missing 'completion'" in out
    code, out = cli("add", "acme", "faq", tmp_path / "missing.jsonl")
    assert code == 1 and "No such file" in out
    code, out = cli("add", "initech", "faq", bad)
    assert code == 1 and "tenant 'initech' does not exist" in out
    code, out = cli("rm", "acme", "faq")
    assert code == 1 and "tenant 'acme' has no dataset 'faq'" in out
    code, out = cli("list", "initech")
    assert code == 1 and "does not exist" in out
    good = tmp_path / "good.jsonl"
    good.write_bytes(CHAT)
    monkeypatch.setenv(MASTER_KEY_ENV, "too-short")
    code, out = cli("add", "acme", "faq", good)
    assert code == 1 and "base64-encoded 32-byte key" in out

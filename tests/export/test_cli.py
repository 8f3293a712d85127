"""`loraplex export gguf`: registry resolution, refusals without tracebacks, the audit entry."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.registry import Registry
from loraplex.vault.artifacts import ArtifactSealer

runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch, bpe_llama_dir):
    """A loraplex home with tenant acme, adapter bot: v1 (serving) and v2 (not promoted)."""
    from loraplex.bench.adapters import write_random_adapter
    from loraplex.model.loader import read_config

    home = tmp_path / "home"
    monkeypatch.setenv("LORAPLEX_HOME", str(home))
    config = read_config(bpe_llama_dir)
    with Registry(home) as registry:
        registry.create_tenant("acme", actor="test")
        for seed in (1, 2):
            src = write_random_adapter(tmp_path / f"src{seed}", config, rank=4, seed=seed)
            registry.push_version("acme", "bot", src, actor="test", validate=None,
                                  sealer=ArtifactSealer.for_home(home))
    return home


def export(*args):
    return runner.invoke(app, ["export", "gguf", *map(str, args)])


def audit_entries(home):
    with Registry(home) as registry:
        return [e for e in registry.audit_log() if e.action == "export.gguf"]


def test_exports_the_serving_version_and_audits_it(home, bpe_llama_dir, tmp_path):
    out = tmp_path / "out" / "bot.gguf"
    result = export("acme", "bot", "--out", out, "--model", bpe_llama_dir, "--dtype", "q8_0")
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"GGUF" and (tmp_path / "out" / "bot.Modelfile").is_file()
    assert "wrote" in result.output
    [entry] = audit_entries(home)
    assert (entry.target, entry.tenant_name, entry.actor.startswith("cli:")) == (
        "acme/bot", "acme", True)
    assert entry.details == {"version": "v1", "dtype": "q8_0", "out": str(out.resolve()),
                             "adapter_only": False}


def test_adapter_only_at_a_version(home, bpe_llama_dir, tmp_path):
    out = tmp_path / "bot-lora.gguf"
    result = export("acme", "bot@v2", "--adapter-only", "--out", out, "--model", bpe_llama_dir)
    assert result.exit_code == 0, result.output
    modelfile = (tmp_path / "bot-lora.Modelfile").read_text()
    assert f"FROM ./{bpe_llama_dir.name}.gguf\nADAPTER ./bot-lora.gguf\n" in modelfile
    [entry] = audit_entries(home)
    assert entry.details["version"] == "v2" and entry.details["adapter_only"] is True


def test_base_model(home, bpe_llama_dir, tmp_path):
    result = export("--base", "--out", tmp_path / "base.gguf", "--model", bpe_llama_dir,
                    "--dtype", "f32")
    assert result.exit_code == 0, result.output
    [entry] = audit_entries(home)
    assert entry.target == f"model:{bpe_llama_dir.name}" and entry.tenant_name is None


@pytest.mark.parametrize("args, message", [
    (["nobody", "bot"], "tenant 'nobody' does not exist"),
    (["acme", "nope"], "adapter 'nope' of tenant 'acme' does not exist"),
    (["acme", "bot@v9"], "v9"),
    (["acme", "bot@latest"], "version 'latest' should look like v3"),
    (["acme"], "missing the ADAPTER of tenant 'acme'"),
    ([], "give TENANT and ADAPTER to export an adapter, or --base"),
    (["--base", "acme", "bot"], "give TENANT and ADAPTER to export an adapter, or --base"),
    (["--base", "--adapter-only"], "cannot go with --base"),
    (["acme", "bot", "--dtype", "int4"], "unknown dtype 'int4'"),
])
def test_clear_errors(home, bpe_llama_dir, tmp_path, args, message):
    result = export(*args, "--out", tmp_path / "x.gguf", "--model", bpe_llama_dir)
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.gguf").exists() and audit_entries(home) == []


def test_existing_file_needs_force(home, bpe_llama_dir, tmp_path):
    out = tmp_path / "bot.gguf"
    out.write_bytes(b"keep me")
    result = export("acme", "bot", "--out", out, "--model", bpe_llama_dir)
    assert result.exit_code == 1 and "pass --force" in result.output
    assert out.read_bytes() == b"keep me" and audit_entries(home) == []
    result = export("acme", "bot", "--out", out, "--model", bpe_llama_dir, "--force")
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"GGUF"

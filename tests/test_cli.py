"""The command line: clear errors, no tracebacks; generate on a tiny model."""

import pytest
from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.config import AUTH_FAILURE_WINDOW_S, MAX_AUTH_FAILURES
from tests.conftest import serve_process

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


def test_serve_with_an_unknown_lora_dtype_is_a_clear_error(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    result = runner.invoke(app, ["serve", "--model", str(tiny_llama_dir), "--lora-dtype", "int4"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "lora_dtype must be one of auto, int8, got 'int4'" in result.output


@pytest.mark.parametrize("flag, field, value", [
    ([], "enable_prefix_caching", True), (["--no-prefix-caching"], "enable_prefix_caching", False),
    ([], "return_window_ms", 50.0), (["--return-window-ms", "0"], "return_window_ms", 0.0),
    (["--return-window-ms", "120"], "return_window_ms", 120.0),
])
def test_serve_hands_its_engine_settings_to_the_engine(flag, field, value, tmp_path,
                                                       monkeypatch, tiny_llama_dir):
    import loraplex.engine.async_engine

    seen = []

    def engine(config):
        seen.append(config)
        raise ValueError("no engine in this test")

    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    monkeypatch.setattr(loraplex.engine.async_engine, "AsyncEngine", engine)
    result = runner.invoke(app, ["serve", "--model", str(tiny_llama_dir), *flag])
    assert result.exit_code == 1 and "no engine in this test" in result.output
    assert [getattr(c, field) for c in seen] == [value]


def test_serve_with_a_bad_return_window_is_a_clear_error(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    result = runner.invoke(app, ["serve", "--model", str(tiny_llama_dir),
                                 "--return-window-ms", "-5"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "return_window_ms must be a number of milliseconds from 0 to 1000" in result.output


@pytest.mark.parametrize("flag, field, value", [
    ([], "allow_private_webhooks", False),
    (["--allow-private-webhooks"], "allow_private_webhooks", True),
    ([], "prewarm_adapters", None), (["--prewarm", "none"], "prewarm_adapters", 0),
    (["--prewarm", "5"], "prewarm_adapters", 5),
    ([], "max_auth_failures", MAX_AUTH_FAILURES),
    (["--max-auth-failures", "5"], "max_auth_failures", 5),
    ([], "auth_failure_window_s", AUTH_FAILURE_WINDOW_S),
    (["--auth-failure-window", "2m"], "auth_failure_window_s", 120),
    (["--max-auth-failure-addresses", "7"], "max_auth_failure_addresses", 7),
])
def test_serve_passes_its_server_settings(flag, field, value, tmp_path, monkeypatch,
                                          tiny_llama_dir):
    import loraplex.engine.async_engine
    import loraplex.server.app

    seen = []

    def create_app(engine, registry, settings, validate):
        seen.append(settings)
        raise ValueError("no app in this test")

    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    monkeypatch.setattr(loraplex.engine.async_engine, "AsyncEngine", lambda config: object())
    monkeypatch.setattr(loraplex.server.app, "create_app", create_app)
    result = runner.invoke(app, ["serve", "--model", str(tiny_llama_dir), *flag])
    assert "no app in this test" in str(result.exception)
    assert [getattr(s, field) for s in seen] == [value]


@pytest.mark.parametrize("flag, message", [
    (["--max-auth-failures", "0"], "max_auth_failures must be a positive number, got 0"),
    (["--auth-failure-window", "soon"], "invalid duration 'soon'"),
    (["--auth-failure-window", "0s"], "auth_failure_window_s must be a positive number, got 0"),
])
def test_serve_with_a_bad_auth_throttle_is_a_clear_error(flag, message, tmp_path, monkeypatch,
                                                         tiny_llama_dir):
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    result = runner.invoke(app, ["serve", "--model", str(tiny_llama_dir), *flag])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert message in result.output


def test_serve_with_a_bad_prewarm_is_a_clear_error(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    result = runner.invoke(app, ["serve", "--model", str(tiny_llama_dir), "--prewarm", "-3"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "--prewarm takes a number, all or none" in result.output


def test_admin_commands(tmp_path, monkeypatch, sharp_llama_dir, sharp_adapters):
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))

    def ok(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    def fails(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 1 and "Traceback" not in result.output
        return result.output

    ok("tenant", "create", "acme")
    assert "already exists" in fails("tenant", "create", "acme")
    assert "acme" in ok("tenant", "list")
    key = ok("key", "create", "acme").strip().splitlines()[-1]
    assert key.startswith("lpx_")
    model = ["--model", sharp_llama_dir]
    assert "v1" in ok("adapter", "push", "acme", "bot", sharp_adapters[0], *model)
    assert "v2" in ok("adapter", "push", "acme", "bot", sharp_adapters[1], *model)
    assert "does not exist" in fails("adapter", "push", "nobody", "bot", sharp_adapters[0],
                                     *model)
    assert "adapter_config.json" in fails("adapter", "push", "acme", "bot", tmp_path, *model)
    assert "v1=90 v2=10" in ok("adapter", "split", "acme", "bot", "v1=90", "v2=10")
    assert "should look like" in fails("adapter", "split", "acme", "bot", "v1:90")
    assert "v2=100" in ok("adapter", "promote", "acme", "bot", "v2")
    assert "v1=90 v2=10" in ok("adapter", "rollback", "acme", "bot")
    assert "v1, v2" in ok("adapter", "list", "acme")
    assert "sha256" in ok("adapter", "show", "acme", "bot")
    assert "v2" in ok("adapter", "stats", "acme", "bot")
    key_id = key.split("_")[1]
    new_key = ok("key", "rotate", key_id, "--overlap", "2h").strip().splitlines()[-1]
    assert new_key.startswith("lpx_") and new_key != key
    assert "invalid duration" in fails("key", "rotate", new_key.split("_")[1], "--overlap", "2w")
    from loraplex.registry import Registry

    with Registry(tmp_path) as registry:  # both work until the overlap ends
        assert registry.authenticate(key) and registry.authenticate(new_key)
    ok("key", "revoke", key_id)
    assert "revoked or expired" in fails("key", "rotate", key_id)
    # Pushed adapters are sealed: no clear weights under the home (they are random floats).
    weights = (sharp_adapters[0] / "adapter_model.safetensors").read_bytes()[-64:]
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and weights in p.read_bytes()]
    ok("data", "shred", "acme", "--yes")
    assert not (tmp_path / "artifacts" / "acme").exists()
    log = ok("audit")
    for action in ("tenant.create", "key.create", "key.rotate", "key.revoke", "rollback",
                   "split", "vault.delete"):
        assert action in log


def test_serve_finishes_running_requests_on_sigterm(tmp_path, sharp_llama_dir, sharp_adapters):
    import json
    import signal

    import httpx

    from loraplex.registry import Registry
    from loraplex.vault.artifacts import ArtifactSealer

    registry = Registry(tmp_path)
    registry.create_tenant("acme", actor="test")
    registry.push_version("acme", "bot", sharp_adapters[0], actor="test", validate=None,
                          sealer=ArtifactSealer.for_home(tmp_path))
    _, key = registry.create_key("acme", actor="test")
    with serve_process(tmp_path, sharp_llama_dir) as (url, server):
        body = {"model": "bot", "prompt": "go", "max_tokens": 120, "temperature": 0,
                "ignore_eos": True, "stream": True}
        finish, sent_signal = None, False
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as response:
            for line in response.iter_lines():
                if not sent_signal:
                    server.send_signal(signal.SIGTERM)  # mid-stream
                    sent_signal = True
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    finish = chunk["choices"][0]["finish_reason"] or finish
        assert finish == "length"  # the running request completed
        # uvicorn re-raises the signal once it has shut down gracefully.
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in server.stderr.read()

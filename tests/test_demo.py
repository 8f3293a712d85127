"""The agency demo's steps on a tiny model, so `./scripts/demo` cannot rot unnoticed: three
tenants trained on their own data, answers over HTTP, an A/B split and rollback, a GGUF export;
a second run reuses everything."""

import gguf
import pytest

from loraplex.demo import ADAPTER, TENANTS, DemoSettings, run_demo
from loraplex.export.modelfile import modelfile_path
from loraplex.registry import Registry
from loraplex.vault.crypto import MASTER_KEY_ENV


@pytest.fixture
def settings(bpe_llama_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(MASTER_KEY_ENV, raising=False)
    return DemoSettings(model=str(bpe_llama_dir), home=tmp_path / "demo", steps=2, rank=4,
                        max_tokens=6, export_dtype="f32")


def test_demo_runs_then_reruns_reusing_what_exists(settings):
    first = run_demo(settings)
    assert first.trained == [f"{t}/{ADAPTER}@v1" for t in TENANTS] + [f"shop/{ADAPTER}@v2"]
    assert set(first.answers) == set(TENANTS)
    assert all(isinstance(answer, str) for answer in first.answers.values())
    # 20 sticky customers over an 80/20 split: both versions serve, v1 the most.
    served = first.split_served
    assert set(served) == {"v1", "v2"} and sum(served.values()) == 20
    assert served["v1"] > served["v2"]
    assert first.split_after_rollback == {1: 100}
    assert gguf.GGUFReader(first.export_path).fields["general.architecture"]
    assert "\nFROM ./law-assistant-v1.f32.gguf\n" in modelfile_path(first.export_path).read_text()
    stats = first.engine_stats
    assert stats["slot_hits"] + stats["slot_misses"] > 0 and len(stats["adapters_in_slots"]) >= 3

    with Registry(settings.home) as registry:  # the console's sign-in key, printed at the end
        assert registry.authenticate(first.console_key).role == "admin"

    second = run_demo(settings)
    assert second.trained == []  # every adapter version exists already
    assert second.export_path == first.export_path
    with Registry(settings.home) as registry:
        for tenant in TENANTS:
            versions = registry.show_adapter(tenant, ADAPTER).versions
            assert len(versions) == (2 if tenant == "shop" else 1)
        assert not [k for t in TENANTS for k in registry.list_keys(t) if k.revoked_at is None]
        assert registry.authenticate(first.console_key) is None  # replaced by the second's
        assert registry.authenticate(second.console_key).role == "admin"
        actions = [e.action for e in registry.audit_log(limit=1000)]
        assert actions.count("data.add") == 3 and actions.count("adapter.rollback") == 2


def test_a_failing_step_says_what_and_how_to_fix(settings, capsys):
    import typer

    settings.data_dir = settings.home / "missing"
    with pytest.raises(typer.Exit):
        run_demo(settings)
    err = capsys.readouterr().err
    assert "step 2 (three tenants and their data) failed" in err and "how to fix" in err
    assert "Traceback" not in err

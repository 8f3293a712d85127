"""Adapter artifacts sealed under the tenant's vault key: shredding, and homes from before."""

import json
import shutil
import stat

import pytest

from loraplex.home import ADAPTER_CACHE_ENV, adapter_cache_dir
from loraplex.registry import CONFIG_FILE, WEIGHTS_FILE, Registry, adapters
from loraplex.registry.artifacts import Artifact, manifest_sha256
from loraplex.vault import IntegrityError, KeyShredded
from loraplex.vault.artifacts import ArtifactSealer, materialized, seal_clear_artifacts

FILES = {CONFIG_FILE: json.dumps({"r": 8}).encode(), WEIGHTS_FILE: b"\x01WEIGHTS-OF-ACME" * 64}


@pytest.fixture
def registry(home):
    with Registry(home) as registry:
        yield registry


@pytest.fixture
def sealer(vault):
    return ArtifactSealer(vault)


def push(registry, sealer, tmp_path, tenant="acme", files=FILES):
    src = tmp_path / f"src-{tenant}"
    src.mkdir(exist_ok=True)
    for name, data in files.items():
        (src / name).write_bytes(data)
    return registry.push_version(tenant, "bot", src, actor="alice", validate=None, sealer=sealer)


def test_shredding_the_tenant_makes_its_adapters_unreadable(registry, sealer, vault, home,
                                                            tmp_path, monkeypatch):
    monkeypatch.delenv(ADAPTER_CACHE_ENV, raising=False)
    mine, theirs = push(registry, sealer, tmp_path), push(registry, sealer, tmp_path, "globex")
    backup = tmp_path / "backup"
    shutil.copytree(mine.artifact_path, backup)  # e.g. a copy in last night's backup
    cache_entry = adapter_cache_dir(home) / "acme" / "entry.safetensors"
    cache_entry.parent.mkdir(parents=True)
    cache_entry.write_bytes(b"packed")
    assert sealer.reader("acme", mine.artifact_path)() == FILES

    vault.delete_tenant_vault("acme", actor="operator")

    assert not mine.artifact_path.exists() and not cache_entry.parent.exists()
    mine.artifact_path.parent.mkdir(parents=True)
    shutil.copytree(backup, mine.artifact_path)  # restored: its key is gone for good
    with pytest.raises(KeyShredded, match="crypto-shredded"):
        sealer.reader("acme", mine.artifact_path)()
    # Pushing again makes a new key; the restored copy is still sealed under the old one.
    push(registry, sealer, tmp_path, files={**FILES, CONFIG_FILE: b'{"r": 4}'})
    with pytest.raises(IntegrityError):
        sealer.reader("acme", mine.artifact_path)()
    assert sealer.reader("globex", theirs.artifact_path)() == FILES  # others are untouched


def test_materialized_is_private_and_removed(registry, sealer, tmp_path):
    version = push(registry, sealer, tmp_path)
    with materialized(sealer.reader("acme", version.artifact_path)) as directory:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert {p.name: p.read_bytes() for p in directory.iterdir()} == FILES
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in directory.iterdir())
    assert not directory.exists()


def test_the_sealer_pickles_as_its_home(sealer, home):
    import pickle

    reader = pickle.loads(pickle.dumps(sealer.reader("acme", home / "artifacts/acme/x")))
    assert reader.sealer.vault.home == home.resolve() and reader.tenant == "acme"


def clear_version(registry, home, tenant, files=FILES):
    """A version as homes from before sealing stored it: artifacts/<sha256>, in clear."""
    sha256 = manifest_sha256(files)
    (home / "artifacts" / sha256).mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (home / "artifacts" / sha256 / name).write_bytes(data)
    with registry._change() as conn:
        tenant_id = conn.execute(
            "SELECT id FROM tenants WHERE name = ?", (tenant,)).fetchone()[0]
        return adapters.insert_version(
            conn, tenant_id, "old", Artifact(sha256, f"artifacts/{sha256}", 1, None, None),
            actor="alice", training_record=None, home=home)


def test_clear_artifacts_are_read_then_sealed_once(registry, sealer, home, monkeypatch):
    monkeypatch.delenv(ADAPTER_CACHE_ENV, raising=False)
    old_entry = adapter_cache_dir(home) / "packed-from-a-clear-path.safetensors"
    old_entry.parent.mkdir(parents=True)
    old_entry.write_bytes(b"packed")
    mine, theirs = clear_version(registry, home, "acme"), clear_version(registry, home, "globex")
    assert mine.artifact_path == theirs.artifact_path  # shared, as homes used to
    assert sealer.reader("acme", mine.artifact_path)() == FILES  # readable before the move

    assert seal_clear_artifacts(registry, sealer, actor="server") == 2
    assert seal_clear_artifacts(registry, sealer, actor="server") == 0
    assert not mine.artifact_path.exists() and not old_entry.exists()
    for tenant in ("acme", "globex"):
        version = registry.get_version(tenant, "old", 1)
        assert version.artifact_path == home / "artifacts" / tenant / mine.sha256
        assert sealer.reader(tenant, version.artifact_path)() == FILES
    for path in (home / "artifacts").rglob("*"):
        assert not path.is_file() or b"WEIGHTS-OF-ACME" not in path.read_bytes(), path
    assert registry.audit_log(tenant="acme")[0].action == "artifact.seal"
    with pytest.raises(Exception, match="versions are immutable"), registry._change() as conn:
        conn.execute("UPDATE versions SET artifact_path = 'artifacts/x' WHERE id = ?",
                     (mine.id,))


def test_a_clear_artifact_that_was_altered_is_not_sealed(registry, sealer, home):
    version = clear_version(registry, home, "acme")
    (version.artifact_path / WEIGHTS_FILE).write_bytes(b"swapped")
    with pytest.raises(IntegrityError, match="sha256 differs"):
        seal_clear_artifacts(registry, sealer, actor="server")

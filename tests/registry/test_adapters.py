import sqlite3

import pytest

from loraplex.registry import InvalidInput, NotFound
from loraplex.registry.artifacts import ADAPTER_FILES

from .conftest import TARGET_MODULES, write_adapter


def test_first_push_creates_the_adapter(registry, home, push, tmp_path):
    version = push()
    assert (version.adapter_name, version.number, version.label) == ("bot", 1, "v1")
    assert version.artifact_path == home / "artifacts" / "acme" / version.sha256
    assert (version.rank, version.target_modules) == (8, tuple(TARGET_MODULES))
    assert version.created_by == "alice"
    assert version.training_record is None
    src = write_adapter(tmp_path / "same")  # push() used seed 0 too
    assert version.size_bytes == sum((src / name).stat().st_size for name in ADAPTER_FILES)
    (info,) = registry.list_adapters("acme")
    assert (info.name, info.versions, info.split, info.active) == ("bot", [version], {1: 100}, 1)


def test_versions_are_numbered_per_adapter_with_global_ids(push):
    bot = [push(seed=seed) for seed in range(3)]
    other = push(seed=9, adapter="other")
    assert [v.number for v in bot] == [1, 2, 3]
    assert other.number == 1
    ids = [v.id for v in [*bot, other]]
    assert ids == sorted(ids) and len(set(ids)) == 4


def test_versions_are_immutable(registry, push):
    push()
    with pytest.raises(sqlite3.IntegrityError, match="versions are immutable"):
        registry._conn.execute("UPDATE versions SET sha256 = 'x'")


def test_get_and_show(registry, push):
    v1 = push(seed=1)
    v2 = push(seed=2, training_record={"dataset": "faq-2024", "steps": 100, "loss": 0.42})
    assert registry.get_version("acme", "bot", 2) == v2
    info = registry.show_adapter("acme", "bot")
    assert info.versions == [v1, v2]
    assert info.versions[1].training_record == {"dataset": "faq-2024", "steps": 100, "loss": 0.42}
    assert (info.split, info.active) == ({1: 100}, 1)


def test_missing_adapter_and_version_messages(registry, push):
    push(seed=1)
    push(seed=2)
    with pytest.raises(NotFound, match="^adapter 'nope' of tenant 'acme' does not exist$"):
        registry.show_adapter("acme", "nope")
    with pytest.raises(
        NotFound, match="^adapter 'bot' of tenant 'acme' has no version v7; versions: v1, v2$"
    ):
        registry.get_version("acme", "bot", 7)


def test_list_adapters_is_per_tenant(registry, push):
    registry.create_tenant("beta", actor="operator")
    push(adapter="zeta")
    push(adapter="alpha")
    push(adapter="mine", tenant="beta")
    assert [a.name for a in registry.list_adapters("acme")] == ["alpha", "zeta"]
    assert [a.name for a in registry.list_adapters("beta")] == ["mine"]


@pytest.mark.parametrize("name", ["", "Bot", "-bot", "bot/../x", "a" * 65])
def test_invalid_adapter_names(registry, push, name):
    with pytest.raises(InvalidInput, match="invalid adapter name"):
        push(adapter=name)
    assert registry.list_adapters("acme") == []


def test_push_for_a_missing_tenant_copies_nothing(registry, home, sealer, tmp_path):
    src = write_adapter(tmp_path / "src")
    with pytest.raises(NotFound, match="^tenant 'nope' does not exist$"):
        registry.push_version("nope", "bot", src, actor="alice", validate=None, sealer=sealer)
    assert not (home / "artifacts").exists()


def test_push_without_validation(push):
    version = push(validate=None)
    assert (version.rank, version.target_modules) == (None, None)


def test_adapter_names_are_per_tenant(registry, push):
    registry.create_tenant("beta", actor="operator")
    mine = push(seed=1)
    theirs = push(seed=2, tenant="beta")
    assert (mine.number, theirs.number) == (1, 1)
    assert registry.get_version("beta", "bot", 1) == theirs

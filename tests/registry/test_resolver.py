import time

import pytest

from loraplex.registry import NotFound, Registry, ResolvedVersion

from .conftest import fake_validate, write_adapter


def test_resolve(registry, acme, push):
    v1 = push(seed=1)
    assert registry.resolve(acme.id, "bot", "user-1") == ResolvedVersion(
        v1.id, 1, v1.artifact_path, "bot"
    )
    assert v1.artifact_path.is_absolute() and v1.artifact_path.is_dir()


def test_a_tenant_cannot_resolve_another_tenants_adapter(registry, acme, push):
    beta = registry.create_tenant("beta", actor="operator")
    with pytest.raises(NotFound) as before_it_exists:
        registry.resolve(beta.id, "bot", "user-1")
    push()  # acme's "bot"
    with pytest.raises(NotFound) as someone_elses:
        registry.resolve(beta.id, "bot", "user-1")
    assert str(someone_elses.value) == str(before_it_exists.value) == "adapter 'bot' does not exist"
    assert registry.resolve(acme.id, "bot", "user-1").adapter_name == "bot"


def test_resolve_follows_the_split(registry, acme, push):
    v1, v2 = push(seed=1), push(seed=2)
    registry.split("acme", "bot", {1: 50, 2: 50}, actor="bob")
    chosen = {u: registry.resolve(acme.id, "bot", f"user-{u}").version_id for u in range(200)}
    assert set(chosen.values()) == {v1.id, v2.id}
    # Sticky: asking again gives every user the same version.
    assert chosen == {u: registry.resolve(acme.id, "bot", f"user-{u}").version_id for u in chosen}


def test_a_pinned_name_resolves_its_version_whatever_the_split(registry, acme, push):
    v1, v2 = push(seed=1), push(seed=2)  # v1 serves: v2 was not promoted
    assert registry.resolve(acme.id, "bot", "user-1").version_id == v1.id
    pinned = registry.resolve(acme.id, "bot:v2", "user-1")
    assert (pinned.version_id, pinned.number, pinned.adapter_name) == (v2.id, 2, "bot")
    beta = registry.create_tenant("beta", actor="operator")
    for name in ("bot:v3", "bot:v0", "nope:v1"):
        with pytest.raises(NotFound, match="does not exist"):
            registry.resolve(acme.id, name, "user-1")
    with pytest.raises(NotFound):  # another tenant's version, even pinned
        registry.resolve(beta.id, "bot:v1", "user-1")


def test_changes_are_seen_at_once(registry, acme, push):
    push(seed=1)
    v2 = push(seed=2)
    assert registry.resolve(acme.id, "bot", "u").number == 1
    registry.promote("acme", "bot", 2, actor="bob")
    assert registry.resolve(acme.id, "bot", "u").version_id == v2.id


def test_a_change_from_another_process_is_seen_within_a_second(registry, home, acme, push):
    push(seed=1)
    push(seed=2)
    assert registry.resolve(acme.id, "bot", "u").number == 1  # now cached
    with Registry(home) as cli:  # another connection, as the CLI process would have
        cli.promote("acme", "bot", 2, actor="cli")
        promoted_at = time.monotonic()
        while registry.resolve(acme.id, "bot", "u").number != 2:
            assert time.monotonic() - promoted_at < 1.0
            time.sleep(0.01)
        cli.rollback("acme", "bot", actor="cli")
    assert registry.resolve(acme.id, "bot", "u").number == 1


def test_an_adapter_created_by_another_process_resolves(registry, home, acme, sealer,
                                                        tmp_path):
    with pytest.raises(NotFound):
        registry.resolve(acme.id, "bot", "u")
    with Registry(home) as cli:
        cli.push_version("acme", "bot", write_adapter(tmp_path / "src"), actor="cli",
                         validate=fake_validate, sealer=sealer)
    assert registry.resolve(acme.id, "bot", "u").number == 1


def test_a_version_whose_artifact_was_shredded_no_longer_resolves(registry, acme, push, sealer):
    push()
    assert registry.resolve(acme.id, "bot", "u").number == 1
    sealer.vault.delete_tenant_vault("acme", actor="operator")  # bumps the generation
    with pytest.raises(NotFound, match="^adapter 'bot' does not exist$"):
        registry.resolve(acme.id, "bot", "u")

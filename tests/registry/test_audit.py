import sqlite3

import pytest

from loraplex.registry import InvalidInput, audit


def actions(entries) -> list[tuple[str, str, str]]:
    return [(e.actor, e.action, e.target) for e in reversed(entries)]  # oldest first


def test_every_administrative_operation_is_audited(registry, acme, push):
    key_id, _ = registry.create_key("acme", actor="operator")
    admin_id, _ = registry.create_admin_key(actor="operator")
    registry.revoke_key(key_id, actor="operator")
    push(seed=1)
    push(seed=2)
    registry.promote("acme", "bot", 2, actor="bob")
    registry.split("acme", "bot", {1: 80, 2: 20}, actor="bob")
    registry.rollback("acme", "bot", actor="carol")
    assert actions(registry.audit_log()) == [
        ("operator", "tenant.create", "acme"),
        ("operator", "key.create", f"key:{key_id}"),
        ("operator", "admin_key.create", f"key:{admin_id}"),
        ("operator", "key.revoke", f"key:{key_id}"),
        ("alice", "adapter.push", "acme/bot"),
        ("alice", "adapter.push", "acme/bot"),
        ("bob", "adapter.promote", "acme/bot"),
        ("bob", "adapter.split", "acme/bot"),
        ("carol", "adapter.rollback", "acme/bot"),
    ]
    newest = registry.audit_log(limit=4)
    assert [e.details for e in newest] == [
        {"split": {"v2": 100}},
        {"split": {"v1": 80, "v2": 20}},
        {"split": {"v2": 100}},
        {
            "version": "v2",
            "sha256": registry.get_version("acme", "bot", 2).sha256,
            "promoted": False,
        },
    ]
    assert registry.audit_log()[-1].tenant_name == "acme"


def test_list_by_tenant(registry, acme, push):
    registry.create_tenant("beta", actor="operator")
    registry.create_admin_key(actor="operator")
    registry.create_key("beta", actor="operator")
    push()
    assert actions(registry.audit_log(tenant="acme")) == [
        ("operator", "tenant.create", "acme"),
        ("alice", "adapter.push", "acme/bot"),
    ]
    assert [e.action for e in registry.audit_log(tenant="beta")] == ["key.create", "tenant.create"]
    assert len(registry.audit_log()) == 5


def test_failed_operations_leave_no_entry(registry, acme, push):
    push()
    before = registry.audit_log()
    with pytest.raises(InvalidInput):
        registry.split("acme", "bot", {1: 50}, actor="bob")
    with pytest.raises(InvalidInput):
        registry.rollback("acme", "bot", actor="bob")
    with pytest.raises(InvalidInput):
        registry.create_tenant("Bad Name", actor="bob")
    registry.promote("acme", "bot", 1, actor="bob")  # already current: nothing changes
    assert registry.audit_log() == before


def test_the_log_is_append_only(registry, acme):
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        registry._conn.execute("UPDATE audit SET actor = 'someone else'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        registry._conn.execute("DELETE FROM audit")
    assert not [name for name in dir(audit) if "update" in name or "delete" in name]


def test_record_audit_for_actions_outside_the_registry(tmp_path):
    from loraplex.registry import Registry

    registry = Registry(tmp_path)
    registry.create_tenant("acme", actor="op")
    registry.record_audit("cli:op", "export.gguf", "acme/bot@v1", {"dtype": "f32"},
                          tenant="acme")
    entry = registry.audit_log(limit=1, tenant="acme")[0]
    assert (entry.actor, entry.action, entry.target) == ("cli:op", "export.gguf", "acme/bot@v1")

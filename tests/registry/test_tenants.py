import hashlib
import re

import pytest

from loraplex.registry import AlreadyExists, InvalidInput, NotFound, Principal, Registry
from loraplex.registry.db import DB_FILE

KEY_RE = re.compile(r"lpx_(?P<key_id>[0-9a-f]{16})_(?P<secret>[A-Za-z0-9_-]{43})")


def test_create_and_list_tenants(registry):
    acme = registry.create_tenant("acme", actor="operator")
    registry.create_tenant("beta-co_2.eu", actor="operator")
    assert registry.get_tenant("acme") == acme
    assert [t.name for t in registry.list_tenants()] == ["acme", "beta-co_2.eu"]


def test_duplicate_tenant(registry, acme):
    with pytest.raises(AlreadyExists, match="^tenant 'acme' already exists$"):
        registry.create_tenant("acme", actor="operator")


@pytest.mark.parametrize(
    "name", ["", "Acme", "-acme", ".acme", "_acme", "ac me", "ac/me", "acme\n", "é", "a" * 65]
)
def test_invalid_tenant_names(registry, name):
    with pytest.raises(InvalidInput, match="invalid tenant name"):
        registry.create_tenant(name, actor="operator")
    assert registry.list_tenants() == []


@pytest.mark.parametrize("name", ["a", "0", "acme-co_1.x", "a" * 64])
def test_valid_tenant_names(registry, name):
    assert registry.create_tenant(name, actor="operator").name == name


def test_missing_tenant(registry):
    with pytest.raises(NotFound, match="^tenant 'nope' does not exist$"):
        registry.get_tenant("nope")
    with pytest.raises(NotFound, match="^tenant 'nope' does not exist$"):
        registry.create_key("nope", actor="operator")


def test_key_authenticates_its_tenant(registry, acme):
    key_id, key = registry.create_key("acme", actor="operator")
    match = KEY_RE.fullmatch(key)
    assert match and match["key_id"] == key_id
    assert registry.authenticate(key) == Principal(key_id, "tenant", acme.id, "acme")


def test_keys_are_distinct(registry, acme):
    keys = {registry.create_key("acme", actor="operator")[1] for _ in range(20)}
    assert len(keys) == 20


def test_only_a_hash_of_the_secret_is_stored(registry, home, acme):
    _, key = registry.create_key("acme", actor="operator")
    _, admin_key = registry.create_admin_key(actor="operator")
    stored = b"".join(path.read_bytes() for path in sorted(home.glob(f"{DB_FILE}*")))
    for each in (key, admin_key):
        secret = KEY_RE.fullmatch(each)["secret"]
        assert each.encode() not in stored
        assert secret.encode() not in stored
        # What is stored instead, so the search above looked in the right place.
        assert hashlib.sha256(secret.encode()).hexdigest().encode() in stored


def test_listing_keys_never_shows_secrets(registry, acme):
    key_id, key = registry.create_key("acme", actor="operator")
    (info,) = registry.list_keys("acme")
    assert (info.key_id, info.role, info.tenant_name, info.revoked_at) == (
        key_id,
        "tenant",
        "acme",
        None,
    )
    secret = KEY_RE.fullmatch(key)["secret"]
    assert secret not in repr(info)
    assert hashlib.sha256(secret.encode()).hexdigest() not in repr(info)


def test_revoked_key_is_refused(registry, acme):
    key_id, key = registry.create_key("acme", actor="operator")
    other_id, other_key = registry.create_key("acme", actor="operator")
    revoked = registry.revoke_key(key_id, actor="operator")
    assert revoked.revoked_at is not None
    assert registry.authenticate(key) is None
    assert registry.authenticate(other_key).key_id == other_id
    # Revoking again changes nothing.
    assert registry.revoke_key(key_id, actor="operator") == revoked
    assert [k.revoked_at is None for k in registry.list_keys("acme")] == [False, True]


def test_a_tenant_cannot_revoke_another_tenants_key(registry, acme):
    registry.create_tenant("beta", actor="operator")
    key_id, key = registry.create_key("acme", actor="operator")
    with pytest.raises(NotFound) as other_tenants:
        registry.revoke_key(key_id, actor="beta", tenant="beta")
    with pytest.raises(NotFound) as missing:
        registry.revoke_key("0123456789abcdef", actor="beta", tenant="beta")
    assert str(other_tenants.value) == f"key '{key_id}' does not exist"
    assert str(missing.value) == "key '0123456789abcdef' does not exist"
    assert registry.authenticate(key) is not None


def test_admin_keys(registry, acme):
    key_id, key = registry.create_admin_key(actor="operator")
    assert KEY_RE.fullmatch(key)
    assert registry.authenticate(key) == Principal(key_id, "admin", None, None)
    assert [k.key_id for k in registry.list_admin_keys()] == [key_id]
    assert registry.list_keys("acme") == []
    registry.revoke_key(key_id, actor="operator")
    assert registry.authenticate(key) is None


def test_wrong_secret_for_a_real_key_id(registry, acme):
    key_id, key = registry.create_key("acme", actor="operator")
    last = key[-1]
    tampered = key[:-1] + ("A" if last != "A" else "B")
    assert registry.authenticate(tampered) is None
    assert registry.authenticate(f"lpx_{key_id}_{'a' * 43}") is None


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "lpx",
        "lpx_",
        "lpx__",
        "Bearer lpx_0123456789abcdef_" + "a" * 43,
        "lpx_0123456789abcdef_" + "a" * 43,  # well-formed, unknown
        "lpx_0123456789ABCDEF_" + "a" * 43,
        "lpx_0123456789abcdef_" + "a" * 42,
        "lpx_0123456789abcdef_" + "a" * 44,
        "lpx_0123456789abcdef_" + "a" * 42 + "\n",
        "lpx_0123456789abcdef_" + "\ud800" * 43,  # lone surrogates: cannot even be encoded
        "lpx_0123456789abcdef_" + "é" * 43,
        "lpx_' OR 1=1 --_" + "a" * 43,
        "\x00" * 100,
        "x" * 100_000,
        None,
        b"lpx_0123456789abcdef_" + b"a" * 43,
    ],
)
def test_garbage_keys_are_refused_quietly(registry, acme, garbage):
    registry.create_key("acme", actor="operator")
    assert registry.authenticate(garbage) is None


def test_keys_work_from_another_connection(registry, home, acme):
    _, key = registry.create_key("acme", actor="operator")
    with Registry(home) as other:
        assert other.authenticate(key).tenant_name == "acme"


def _move_clock(monkeypatch, seconds: float) -> None:
    """Every now() of the registry `seconds` later than the real clock."""
    from datetime import UTC, datetime, timedelta

    import loraplex.registry.db as db
    import loraplex.registry.facade as facade
    import loraplex.registry.tenants as tenants_module

    def later() -> str:
        return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")

    for module in (db, facade, tenants_module):
        monkeypatch.setattr(module, "now", later)


@pytest.mark.parametrize("role", ["tenant", "admin"])
def test_a_rotated_key_works_until_its_overlap_ends(registry, acme, monkeypatch, role):
    if role == "tenant":
        old_id, old_key = registry.create_key("acme", actor="operator")
    else:
        old_id, old_key = registry.create_admin_key(actor="operator")
    new_id, new_key, old = registry.rotate_key(old_id, actor="operator", overlap_s=3600)
    assert new_id != old_id and old.expires_at is not None and old.revoked_at is None
    for key, key_id in ((old_key, old_id), (new_key, new_id)):  # both work in the overlap
        principal = registry.authenticate(key)
        assert (principal.key_id, principal.role) == (key_id, role)
        assert principal.tenant_name == ("acme" if role == "tenant" else None)
    _move_clock(monkeypatch, 3601)
    assert registry.authenticate(old_key) is None
    assert registry.authenticate(new_key).key_id == new_id
    with pytest.raises(InvalidInput, match="revoked or expired"):
        registry.rotate_key(old_id, actor="operator")
    entry = registry.audit_log(limit=1)[0]
    assert (entry.action, entry.target) == ("key.rotate", f"key:{old_id}")
    assert entry.details == {"role": role, "new_key": new_id, "old_expires_at": old.expires_at}


def test_rotating_with_no_overlap_ends_the_old_key_now(registry, acme):
    old_id, old_key = registry.create_key("acme", actor="operator")
    _, new_key, _ = registry.rotate_key(old_id, actor="operator", overlap_s=0)
    assert registry.authenticate(old_key) is None and registry.authenticate(new_key)


def test_rotating_again_never_extends_the_old_key(registry, acme):
    old_id, _ = registry.create_key("acme", actor="operator")
    _, _, first = registry.rotate_key(old_id, actor="operator", overlap_s=60)
    _, _, second = registry.rotate_key(old_id, actor="operator", overlap_s=3600)
    assert second.expires_at == first.expires_at
    assert [k.key_id for k in registry.list_keys("acme")][0] == old_id


@pytest.mark.parametrize("overlap", [-1, 30 * 24 * 3600 + 1, 1.5])
def test_a_bad_overlap_is_refused(registry, acme, overlap):
    old_id, old_key = registry.create_key("acme", actor="operator")
    with pytest.raises(InvalidInput, match="overlap must be 0 to"):
        registry.rotate_key(old_id, actor="operator", overlap_s=overlap)
    assert registry.list_keys("acme")[0].expires_at is None and len(registry.list_keys("acme")) == 1


def test_a_tenant_cannot_rotate_another_tenants_key(registry, acme):
    registry.create_tenant("beta", actor="operator")
    key_id, _ = registry.create_key("acme", actor="operator")
    with pytest.raises(NotFound, match=f"^key '{key_id}' does not exist$"):
        registry.rotate_key(key_id, actor="operator", tenant="beta")

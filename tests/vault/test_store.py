"""The vault: immutable versions, encryption at rest, tamper evidence, crypto-shredding."""

import base64
import os
import stat

import pytest

from loraplex.registry import NotFound, Registry
from loraplex.vault import (
    DatasetNotFound,
    IntegrityError,
    InvalidDataset,
    MasterKeyError,
    Vault,
    parse_jsonl,
)
from loraplex.vault.crypto import MASTER_KEY_ENV
from tests.vault.conftest import CHAT, SECRET_ANSWER, SECRET_QUESTION, jsonl

OTHER = jsonl({"prompt": "Another question?", "completion": "Another answer."})


def files_under(path):
    return [p for p in path.rglob("*") if p.is_file()]


def enc_file(home, tenant, name, label):
    return home / "vault" / "tenants" / tenant / name / f"{label}.enc"


def test_add_read_list(vault, tmp_path):
    source = tmp_path / "faq.jsonl"
    source.write_bytes(CHAT)
    v1 = vault.add("acme", "faq", source, actor="alice")
    assert (v1.tenant, v1.name, v1.label, v1.num_records, v1.created_by) == (
        "acme", "faq", "v1", 2, "alice")
    assert v1.size_bytes == len(CHAT)
    assert vault.read("acme", "faq") == parse_jsonl(CHAT)
    assert vault.list("acme") == [v1] and vault.list("globex") == []


def test_versions_are_immutable(vault):
    v1 = vault.add("acme", "faq", CHAT, actor="alice")
    v2 = vault.add("acme", "faq", OTHER, actor="bob")
    assert (v1.label, v2.label) == ("v1", "v2") and v1.sha256 != v2.sha256
    assert vault.read("acme", "faq") == parse_jsonl(OTHER)  # the latest by default
    assert vault.read("acme", "faq", 1) == parse_jsonl(CHAT)  # v1 is unchanged
    assert vault.get("acme", "faq", 1) == v1
    assert vault.list("acme") == [v1, v2]
    with pytest.raises(DatasetNotFound, match="no dataset 'faq' v3"):
        vault.read("acme", "faq", 3)


def test_tenants_see_only_their_own_datasets(vault):
    vault.add("acme", "faq", CHAT, actor="alice")
    with pytest.raises(DatasetNotFound, match="tenant 'globex' has no dataset 'faq'"):
        vault.read("globex", "faq")


def test_unknown_tenant_and_bad_names(vault):
    with pytest.raises(NotFound, match="tenant 'initech' does not exist"):
        vault.add("initech", "faq", CHAT, actor="alice")
    with pytest.raises(NotFound):
        vault.list("initech")
    with pytest.raises(ValueError, match="invalid dataset name '../x'"):
        vault.add("acme", "../x", CHAT, actor="alice")


def test_invalid_upload_stores_nothing(vault, home):
    with pytest.raises(InvalidDataset, match="line 2: invalid JSON"):
        vault.add("acme", "faq", CHAT.splitlines()[0] + b"\n{oops\n", actor="alice")
    assert vault.list("acme") == []
    assert not (home / "vault" / "tenants").exists()


def test_file_too_large(home, tmp_path):
    source = tmp_path / "big.jsonl"
    source.write_bytes(CHAT)
    with Vault(home, max_dataset_bytes=len(CHAT) - 1) as vault:
        for upload in (source, CHAT):
            with pytest.raises(InvalidDataset, match="too large"):
                vault.add("acme", "faq", upload, actor="alice")


def test_encrypted_at_rest(vault, home):
    vault.add("acme", "faq", CHAT, actor="alice")
    vault.read("acme", "faq")
    files = files_under(home)
    assert enc_file(home, "acme", "faq", "v1") in files
    for path in files:
        content = path.read_bytes()
        for secret in (SECRET_QUESTION, SECRET_ANSWER, "launch code"):
            assert secret.encode() not in content, path
        assert CHAT not in content
    for path in files_under(home / "vault"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((home / "vault").stat().st_mode) == 0o700


def test_master_key_file_is_private_and_reused(vault, home):
    vault.add("acme", "faq", CHAT, actor="alice")
    key_file = home / "vault" / "master.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(base64.b64decode(key_file.read_text())) == 32
    with Vault(home) as again:  # another process finds the same key
        assert again.read("acme", "faq") == parse_jsonl(CHAT)


def test_master_key_readable_by_others_is_refused(vault, home):
    vault.add("acme", "faq", CHAT, actor="alice")
    key_file = home / "vault" / "master.key"
    key_file.chmod(0o644)
    with Vault(home) as again, pytest.raises(MasterKeyError, match="chmod 600"):
        again.read("acme", "faq")


def test_master_key_from_the_environment(home, monkeypatch):
    monkeypatch.setenv(MASTER_KEY_ENV, base64.b64encode(os.urandom(32)).decode())
    with Vault(home) as vault:
        vault.add("acme", "faq", CHAT, actor="alice")
        assert vault.read("acme", "faq") == parse_jsonl(CHAT)
    assert not (home / "vault" / "master.key").exists()


@pytest.mark.parametrize("value", ["not base64!", base64.b64encode(b"short").decode(), ""])
def test_malformed_master_key_is_a_clear_error(home, monkeypatch, value):
    monkeypatch.setenv(MASTER_KEY_ENV, value)
    with Vault(home) as vault, pytest.raises(MasterKeyError, match="base64-encoded 32-byte key"):
        vault.add("acme", "faq", CHAT, actor="alice")


def test_wrong_master_key_is_a_clear_error(vault, home, monkeypatch):
    vault.add("acme", "faq", CHAT, actor="alice")
    monkeypatch.setenv(MASTER_KEY_ENV, base64.b64encode(os.urandom(32)).decode())
    with Vault(home) as wrong:
        assert len(wrong.list("acme")) == 1  # listing needs no key
        with pytest.raises(MasterKeyError, match="made with another master key"):
            wrong.read("acme", "faq")
        with pytest.raises(MasterKeyError):
            wrong.add("acme", "faq", OTHER, actor="alice")


def test_tampered_ciphertext_is_detected(vault, home):
    vault.add("acme", "faq", CHAT, actor="alice")
    path = enc_file(home, "acme", "faq", "v1")
    data = bytearray(path.read_bytes())
    data[40] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="fails its integrity check"):
        vault.read("acme", "faq")
    path.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        vault.read("acme", "faq")


def test_ciphertext_moved_to_another_place_does_not_decrypt(vault, home):
    vault.add("acme", "faq", CHAT, actor="alice")
    vault.add("acme", "faq", OTHER, actor="alice")
    vault.add("globex", "faq", OTHER, actor="bob")
    # Another version of the same dataset: same data key, but the associated data differs.
    v1, v2 = enc_file(home, "acme", "faq", "v1"), enc_file(home, "acme", "faq", "v2")
    v2.write_bytes(v1.read_bytes())
    with pytest.raises(IntegrityError):
        vault.read("acme", "faq", 2)
    # Tenant A's file in tenant B's place.
    enc_file(home, "globex", "faq", "v1").write_bytes(v1.read_bytes())
    with pytest.raises(IntegrityError):
        vault.read("globex", "faq")
    assert vault.read("acme", "faq", 1) == parse_jsonl(CHAT)


def test_remove_deletes_files_and_frees_nothing_else(vault, home):
    vault.add("acme", "faq", CHAT, actor="alice")
    vault.add("acme", "faq", OTHER, actor="alice")
    vault.add("acme", "tone", OTHER, actor="alice")
    removed = vault.remove("acme", "faq", actor="alice")
    assert [v.label for v in removed] == ["v1", "v2"]
    assert not (home / "vault" / "tenants" / "acme" / "faq").exists()
    assert [v.name for v in vault.list("acme")] == ["tone"]
    with pytest.raises(DatasetNotFound):
        vault.read("acme", "faq")
    with pytest.raises(DatasetNotFound, match="has no dataset 'faq'"):
        vault.remove("acme", "faq", actor="alice")


def test_delete_tenant_vault_crypto_shreds(vault, home):
    vault.add("acme", "faq", CHAT, actor="alice")
    vault.add("globex", "faq", OTHER, actor="bob")
    stolen = enc_file(home, "acme", "faq", "v1").read_bytes()  # e.g. a copy in a backup
    index = home / "vault" / "vault.sqlite3"
    wrapped_key = vault._conn.execute(
        "SELECT wrapped_key FROM data_keys WHERE tenant = 'acme'").fetchone()[0]
    assert wrapped_key in index.read_bytes()
    for tenant in ("acme", "globex"):  # GGUF exports: plain copies of a tenant's models
        (home / "exports" / tenant / "export-1").mkdir(parents=True)
        (home / "exports" / tenant / "export-1" / "model.gguf").write_bytes(b"GGUF")

    vault.delete_tenant_vault("acme", actor="operator")

    assert vault.list("acme") == []
    assert not (home / "vault" / "tenants" / "acme").exists()
    assert not (home / "exports" / "acme").exists()
    assert (home / "exports" / "globex" / "export-1" / "model.gguf").read_bytes() == b"GGUF"
    # The wrapped key is gone from every file, not just unlinked from the index.
    for path in files_under(home):
        assert wrapped_key not in path.read_bytes(), path
    # A new dataset gets a new key; the stolen ciphertext, put back where it was, stays sealed.
    vault.add("acme", "faq", OTHER, actor="alice")
    enc_file(home, "acme", "faq", "v1").write_bytes(stolen)
    with pytest.raises(IntegrityError):
        vault.read("acme", "faq")
    assert vault.read("globex", "faq") == parse_jsonl(OTHER)  # others are untouched
    vault.delete_tenant_vault("acme", actor="operator")
    vault.delete_tenant_vault("acme", actor="operator")  # idempotent


def test_audit_entries(vault, home):
    vault.add("acme", "faq", CHAT, actor="alice")
    vault.remove("acme", "faq", actor="bob")
    vault.delete_tenant_vault("acme", actor="operator")
    with Registry(home) as registry:
        entries = registry.audit_log(tenant="acme")
    assert [(e.action, e.actor, e.target) for e in entries[:3]] == [
        ("vault.delete", "operator", "acme"),
        ("data.rm", "bob", "acme/faq"),
        ("data.add", "alice", "acme/faq"),
    ]
    assert entries[2].details["records"] == 2 and entries[1].details["versions"] == ["v1"]


def test_a_write_killed_midway_is_swept_at_the_next_open(vault, home):
    """SIGKILL between writing a dataset file and committing its row leaves the file (or its
    temp file, if mid-write): the next Vault on the home deletes both, under the write lock."""
    vault.add("acme", "faq", CHAT, actor="alice")
    folder = home / "vault" / "tenants" / "acme" / "faq"
    half_written, uncommitted = folder / ".v2.enc.tmp", folder / "v2.enc"
    half_written.write_bytes(b"\x00" * 10)
    uncommitted.write_bytes(b"\x00" * 10)
    with Vault(home) as reopened:
        assert sorted(p.name for p in folder.iterdir()) == ["v1.enc"]
        assert reopened.read_bytes("acme", "faq") == CHAT
        assert reopened.add("acme", "faq", OTHER, actor="alice").number == 2

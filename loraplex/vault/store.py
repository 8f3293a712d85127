"""Vault: tenants' training datasets, as immutable versions, encrypted at rest.

Layout under `<home>/vault/`:
    master.key                                   unless LORAPLEX_MASTER_KEY is set
    vault.sqlite3                                index: wrapped keys, dataset versions, files
    tenants/<tenant>/<dataset>/v<N>.enc          nonce + AES-GCM ciphertext of the JSONL file
(Tenant dirs live under tenants/ so no tenant name can collide with the index or the key.)

Keys: each dataset version is encrypted under a key of its own, stored wrapped by the tenant's
data key, which is stored wrapped by the master key. Deleting a dataset deletes its versions'
keys, and deleting a tenant's vault its data key: either way the ciphertexts, and any copy of
them in a backup, can no longer be read (crypto-shredding). Adapter artifacts keep their keys
under the same tenant data key (wrap_key; vault/artifacts.py), so shredding covers them too.
Versions stored before per-version keys existed are encrypted under the tenant's data key
itself, and still read.

Files (the OpenAI files API, `add_file`): a dataset named by the file's id, with the name the
client uploaded it under and its purpose.

Plaintext exists only in memory: uploads are validated and encrypted from bytes, and read()
decrypts into bytes and parses them. Every method names its tenant, and files are found from
(tenant, dataset, version) alone: a caller never hands the vault a path to read.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from loraplex.home import EXPORTS_DIR, adapter_cache_dir
from loraplex.registry import Registry
from loraplex.registry.artifacts import ARTIFACTS_DIR
from loraplex.registry.db import now, transaction
from loraplex.registry.tenants import check_name
from loraplex.vault import crypto
from loraplex.vault.errors import (
    DatasetNotFound,
    IntegrityError,
    InvalidDataset,
    KeyShredded,
    MasterKeyError,
)
from loraplex.vault.files import read_at_most, remove_tree, sweep_partial_writes, write_private
from loraplex.vault.records import parse_jsonl

VAULT_DIR = "vault"
INDEX_FILE = "vault.sqlite3"
TENANTS_DIR = "tenants"
MAX_DATASET_BYTES = 100 * 1024 * 1024
_SCHEMA = [
    # One data key per tenant, stored wrapped by the master key. Deleting the row is what
    # crypto-shreds the tenant's data.
    """CREATE TABLE IF NOT EXISTS data_keys (
    tenant TEXT PRIMARY KEY,
    wrapped_key BLOB NOT NULL,
    created_at TEXT NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS dataset_versions (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    number INTEGER NOT NULL CHECK (number >= 1),
    sha256 TEXT NOT NULL,
    num_records INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    PRIMARY KEY (tenant, name, number)
)""",
    """CREATE TABLE IF NOT EXISTS dataset_keys (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    number INTEGER NOT NULL,
    wrapped_key BLOB NOT NULL,
    PRIMARY KEY (tenant, name, number)
)""",
    """CREATE TABLE IF NOT EXISTS dataset_files (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    created_at INTEGER NOT NULL
)""",
    """CREATE TRIGGER IF NOT EXISTS dataset_versions_are_immutable
BEFORE UPDATE ON dataset_versions
BEGIN
    SELECT RAISE(ABORT, 'dataset versions are immutable');
END""",
]


@dataclass(frozen=True)
class DatasetVersion:
    tenant: str
    name: str
    number: int  # 1, 2, 3... within the dataset
    sha256: str  # of the plaintext file as uploaded
    num_records: int
    size_bytes: int  # of the plaintext
    created_at: str
    created_by: str

    @property
    def label(self) -> str:
        return f"v{self.number}"


@dataclass(frozen=True)
class DatasetFile:
    """A dataset uploaded through the files API: its version 1 under the name `id`."""

    id: str  # "file-" and 24 hex digits
    filename: str  # as the client named it
    purpose: str
    created_at: int  # Unix seconds, as the API shows it
    dataset: DatasetVersion


class Vault:
    def __init__(self, home: Path, *, max_dataset_bytes: int = MAX_DATASET_BYTES):
        self.home = Path(home)
        self.dir = self.home / VAULT_DIR
        self.max_dataset_bytes = max_dataset_bytes
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._registry = Registry(self.home)  # tenants, and the audit log
        # Made private before SQLite opens it (SQLite gives its journal the same mode).
        os.close(os.open(self.dir / INDEX_FILE, os.O_WRONLY | os.O_CREAT, 0o600))
        self._conn = sqlite3.connect(
            self.dir / INDEX_FILE, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        # secure_delete: SQLite overwrites deleted rows with zeros, so a shredded data key does
        # not linger in the file's free pages.
        self._conn.execute("PRAGMA secure_delete = ON")
        self._conn.execute("PRAGMA busy_timeout = 5000")  # the server and the CLI may overlap
        self._lock = threading.Lock()  # one connection, shared by the server's threads
        with self._change() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            # A write killed midway (SIGKILL, power loss) leaves a temp file, or a dataset
            # file whose row never committed: swept here, under the write lock.
            self._sweep(conn)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        self._registry.close()

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @cached_property
    def _master_key(self) -> bytes:
        # Loaded on first need: listing datasets works without the key.
        return crypto.load_master_key(self.dir)

    def add(self, tenant: str, name: str, source: str | Path | bytes, *, actor: str
            ) -> DatasetVersion:
        """Validate a JSONL dataset and store it, encrypted, as the next version of the tenant's
        dataset `name`. `source` is the file's bytes, or (for the CLI, never for a client's
        request) a path to read."""
        check_name("dataset", name)
        data = source if isinstance(source, bytes) else read_at_most(
            Path(source), self.max_dataset_bytes + 1)
        records = self._check_upload(tenant, data)
        with self._change() as conn:
            return self._store(conn, tenant, name, data, len(records), actor)

    def add_file(self, tenant: str, filename: str, purpose: str, data: bytes, *, actor: str
                 ) -> DatasetFile:
        """Validate and store an uploaded file as a new dataset named by a fresh file id."""
        records = self._check_upload(tenant, data)
        file_id = f"file-{secrets.token_hex(12)}"
        with self._change() as conn:
            version = self._store(conn, tenant, file_id, data, len(records), actor)
            created_at = int(time.time())
            conn.execute("INSERT INTO dataset_files VALUES (?, ?, ?, ?, ?)",
                         (file_id, tenant, filename, purpose, created_at))
        return DatasetFile(file_id, filename, purpose, created_at, version)

    def list_files(self, tenant: str) -> list[DatasetFile]:
        """The tenant's uploaded files, newest first."""
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM dataset_files WHERE tenant = ?"
                                " ORDER BY created_at DESC, rowid DESC", (tenant,)).fetchall()
            return [self._file(conn, row) for row in rows]

    def get_file(self, tenant: str, file_id: str) -> DatasetFile:
        """The file; DatasetNotFound also when it is another tenant's."""
        with self._read() as conn:
            row = conn.execute("SELECT * FROM dataset_files WHERE id = ? AND tenant = ?",
                               (file_id, tenant)).fetchone()
            if row is None:
                raise DatasetNotFound(f"No such File object: {file_id}")
            return self._file(conn, row)

    def remove_file(self, tenant: str, file_id: str, *, actor: str) -> None:
        """Delete the file: its key, its ciphertext and its index rows (crypto-shredded)."""
        self.get_file(tenant, file_id)
        with self._change() as conn:
            conn.execute("DELETE FROM dataset_files WHERE id = ? AND tenant = ?",
                         (file_id, tenant))
            self._remove(conn, tenant, file_id, actor)

    def list(self, tenant: str) -> list[DatasetVersion]:
        """Every version of every dataset of the tenant, by name then version."""
        self._registry.get_tenant(tenant)
        with self._read() as conn:
            rows = conn.execute(
                "SELECT * FROM dataset_versions WHERE tenant = ? ORDER BY name, number",
                (tenant,))
            return [_version(row) for row in rows]

    def get(self, tenant: str, name: str, version: int | None = None) -> DatasetVersion:
        """One version of a dataset (the latest when version is None)."""
        with self._read() as conn:
            return self._get(conn, tenant, name, version)

    def read(self, tenant: str, name: str, version: int | None = None) -> list[dict]:
        """The records of a dataset version (the latest by default), decrypted in memory."""
        return parse_jsonl(self.read_bytes(tenant, name, version))

    def read_bytes(self, tenant: str, name: str, version: int | None = None) -> bytes:
        """A dataset version's file as uploaded, decrypted in memory and checked."""
        with self._read() as conn:
            dataset = self._get(conn, tenant, name, version)
            key = self._version_key(conn, dataset)
        where = f"dataset '{name}' {dataset.label} of tenant '{tenant}'"
        try:
            sealed = self._path(dataset).read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"{where}: its encrypted file is missing") from None
        data = crypto.decrypt(key, sealed, _dataset_aad(tenant, name, dataset.number))
        if data is None or hashlib.sha256(data).hexdigest() != dataset.sha256:
            raise IntegrityError(
                f"{where} fails its integrity check: the file was modified, corrupted, or "
                "moved here from elsewhere")
        return data

    def remove(self, tenant: str, name: str, *, actor: str) -> list[DatasetVersion]:
        """Delete every version of a dataset, files included; returns what was deleted.

        The name is then free: adding it again starts a new dataset at v1 (training records
        keep each version's sha256, so they still say exactly which data they used).
        """
        with self._change() as conn:
            return self._remove(conn, tenant, name, actor)

    def delete_tenant_vault(self, tenant: str, *, actor: str) -> None:
        """Crypto-shred all the tenant's data: destroy its data key, then its files and index,
        its adapter artifacts (sealed under that key: vault/artifacts.py), its entries in the
        serving cache (the engine's packed, plain form of its adapters) and its GGUF exports
        (plain copies of its models, export/jobs.py).

        The key goes first, in its own transaction: once that commits, every ciphertext of the
        tenant is unreadable, wherever copies of it remain, even if what follows is interrupted
        (calling this again finishes the job).
        """
        with self._change() as conn:
            conn.execute("DELETE FROM data_keys WHERE tenant = ?", (tenant,))
            self._registry.record_audit(actor, "vault.delete", tenant, {}, tenant=tenant)
        with self._change() as conn:
            for table in ("dataset_keys", "dataset_files", "dataset_versions"):
                conn.execute(f"DELETE FROM {table} WHERE tenant = ?", (tenant,))
            remove_tree(self.dir / TENANTS_DIR / tenant)
        remove_tree(self.home / ARTIFACTS_DIR / tenant)
        remove_tree(adapter_cache_dir(self.home) / tenant)
        remove_tree(self.home / EXPORTS_DIR / tenant)

    def wrap_key(self, tenant: str, key: bytes, purpose: bytes) -> bytes:
        """`key` wrapped by the tenant's data key (made on first use), bound to `purpose`: how
        other stores (adapter artifacts) put their keys under the tenant's crypto-shredding."""
        with self._change() as conn:
            return crypto.encrypt(self._data_key(conn, tenant, create=True), key, purpose)

    def unwrap_key(self, tenant: str, wrapped: bytes, purpose: bytes) -> bytes:
        """The key wrap_key wrapped; KeyShredded once the tenant's vault was deleted."""
        with self._read() as conn:
            row = conn.execute("SELECT 1 FROM data_keys WHERE tenant = ?", (tenant,)).fetchone()
            if row is None:
                raise KeyShredded(f"tenant '{tenant}' has no key in the vault: its data was "
                                  "deleted (crypto-shredded) and can no longer be read")
            tenant_key = self._data_key(conn, tenant, create=False)
        key = crypto.decrypt(tenant_key, wrapped, purpose)
        if key is None:
            raise IntegrityError(f"a key of tenant '{tenant}' fails its integrity check: it was "
                                 "sealed under a data key since deleted, or tampered with")
        return key

    # -- helpers ---------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self._conn, write=False):
            yield self._conn

    @contextmanager
    def _change(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                with transaction(self._conn):
                    yield self._conn
            except BaseException:
                # A write that failed (a full disk) may have left its temp file, or a dataset
                # file whose row did not commit: gone now, not at the next start. Never in
                # place of the error itself (the next start sweeps what this one cannot).
                with suppress(sqlite3.Error, OSError):
                    self._sweep(self._conn)
                raise

    def _sweep(self, conn: sqlite3.Connection) -> None:
        """Delete partial writes (see sweep_partial_writes); call with the write lock held."""
        kept = {self._path(_version(row)) for row in conn.execute(
            "SELECT * FROM dataset_versions")}
        sweep_partial_writes(self.dir / TENANTS_DIR, kept)

    def _check_upload(self, tenant: str, data: bytes) -> list[dict]:
        """The upload's records, once the tenant exists and the data is a valid dataset."""
        self._registry.get_tenant(tenant)  # raises NotFound
        if len(data) > self.max_dataset_bytes:
            raise InvalidDataset(
                f"dataset too large: over {self.max_dataset_bytes} bytes (the limit)")
        return parse_jsonl(data)

    def _store(self, conn: sqlite3.Connection, tenant: str, name: str, data: bytes,
               num_records: int, actor: str) -> DatasetVersion:
        """Encrypt `data` as the next version of the dataset, under a key of its own."""
        tenant_key = self._data_key(conn, tenant, create=True)
        (number,) = conn.execute(
            "SELECT COALESCE(MAX(number), 0) + 1 FROM dataset_versions"
            " WHERE tenant = ? AND name = ?", (tenant, name)).fetchone()
        version = DatasetVersion(tenant, name, number, hashlib.sha256(data).hexdigest(),
                                 num_records, len(data), now(), actor)
        key, aad = crypto.new_key(), _dataset_aad(tenant, name, number)
        write_private(self._path(version), crypto.encrypt(key, data, aad))
        conn.execute("INSERT INTO dataset_keys VALUES (?, ?, ?, ?)",
                     (tenant, name, number, crypto.encrypt(tenant_key, key, b"key:" + aad)))
        conn.execute(
            "INSERT INTO dataset_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (tenant, name, number, version.sha256, version.num_records,
             version.size_bytes, version.created_at, actor))
        # Inside the transaction: if the audit entry cannot be written, nothing is stored.
        self._registry.record_audit(
            actor, "data.add", f"{tenant}/{name}",
            {"version": version.label, "sha256": version.sha256, "records": num_records},
            tenant=tenant)
        return version

    def _remove(self, conn: sqlite3.Connection, tenant: str, name: str, actor: str
                ) -> list[DatasetVersion]:
        rows = conn.execute(
            "SELECT * FROM dataset_versions WHERE tenant = ? AND name = ? ORDER BY number",
            (tenant, name)).fetchall()
        if not rows:
            raise DatasetNotFound(f"tenant '{tenant}' has no dataset '{name}'")
        for table in ("dataset_keys", "dataset_versions"):
            conn.execute(f"DELETE FROM {table} WHERE tenant = ? AND name = ?", (tenant, name))
        # Files go before the commit: if deleting them fails, the index keeps the rows.
        remove_tree(self.dir / TENANTS_DIR / tenant / name)
        versions = [_version(row) for row in rows]
        self._registry.record_audit(
            actor, "data.rm", f"{tenant}/{name}",
            {"versions": [v.label for v in versions]}, tenant=tenant)
        return versions

    def _version_key(self, conn: sqlite3.Connection, dataset: DatasetVersion) -> bytes:
        """The key a version was encrypted under (the tenant's own, for older versions)."""
        tenant_key = self._data_key(conn, dataset.tenant, create=False)
        row = conn.execute("SELECT wrapped_key FROM dataset_keys WHERE tenant = ? AND name = ?"
                           " AND number = ?", (dataset.tenant, dataset.name, dataset.number)
                           ).fetchone()
        if row is None:
            return tenant_key
        aad = _dataset_aad(dataset.tenant, dataset.name, dataset.number)
        key = crypto.decrypt(tenant_key, row["wrapped_key"], b"key:" + aad)
        if key is None:
            raise IntegrityError(f"dataset '{dataset.name}' {dataset.label} of tenant "
                                 f"'{dataset.tenant}': its key fails its integrity check")
        return key

    def _file(self, conn: sqlite3.Connection, row: sqlite3.Row) -> DatasetFile:
        version = self._get(conn, row["tenant"], row["id"], 1)
        return DatasetFile(row["id"], row["filename"], row["purpose"], row["created_at"],
                           version)

    def _get(self, conn: sqlite3.Connection, tenant: str, name: str, number: int | None
             ) -> DatasetVersion:
        if number is None:
            row = conn.execute(
                "SELECT * FROM dataset_versions WHERE tenant = ? AND name = ?"
                " ORDER BY number DESC LIMIT 1", (tenant, name)).fetchone()
            missing = f"tenant '{tenant}' has no dataset '{name}'"
        else:
            row = conn.execute(
                "SELECT * FROM dataset_versions WHERE tenant = ? AND name = ? AND number = ?",
                (tenant, name, number)).fetchone()
            missing = f"tenant '{tenant}' has no dataset '{name}' v{number}"
        if row is None:
            raise DatasetNotFound(missing)
        return _version(row)

    def _data_key(self, conn: sqlite3.Connection, tenant: str, *, create: bool) -> bytes:
        """The tenant's data key, unwrapped; made (and stored wrapped) on first use if create."""
        aad = f"loraplex-vault:data-key:{tenant}".encode()
        row = conn.execute("SELECT wrapped_key FROM data_keys WHERE tenant = ?",
                           (tenant,)).fetchone()
        if row is None:
            if not create:
                # Dataset rows without a key: the vault was deleted, and its clean-up cut short.
                raise DatasetNotFound(f"tenant '{tenant}' has no data in the vault")
            key = crypto.new_key()
            conn.execute("INSERT INTO data_keys VALUES (?, ?, ?)",
                         (tenant, crypto.encrypt(self._master_key, key, aad), now()))
            return key
        key = crypto.decrypt(self._master_key, row["wrapped_key"], aad)
        if key is None:
            raise MasterKeyError(
                f"the master key cannot unwrap the data key of tenant '{tenant}': this vault "
                f"was made with another master key ({crypto.MASTER_KEY_ENV} or "
                f"{self.dir / crypto.MASTER_KEY_FILE}), or its index was tampered with")
        return key

    def _path(self, version: DatasetVersion) -> Path:
        return (self.dir / TENANTS_DIR / version.tenant / version.name
                / f"{version.label}.enc")


def _dataset_aad(tenant: str, name: str, number: int) -> bytes:
    return f"loraplex-vault:dataset:{tenant}/{name}/v{number}".encode()


def _version(row: sqlite3.Row) -> DatasetVersion:
    return DatasetVersion(row["tenant"], row["name"], row["number"], row["sha256"],
                          row["num_records"], row["size_bytes"], row["created_at"],
                          row["created_by"])

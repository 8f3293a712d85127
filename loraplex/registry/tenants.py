"""Tenants and their API keys (and the operator's admin keys, which work the same way).

A key reads `lpx_<key_id>_<secret>`. It is shown once, at creation; the database keeps only
sha256(secret), so neither a leaked database file nor a backup can be used to call the API.
key_id is not secret: it names the key in listings, logs and revocation.

Rotation makes a new key of the same role and tenant and gives the old one an expiry, an
overlap window long enough to deploy the new key everywhere before the old one stops working.
An expired key fails authentication exactly as a revoked or unknown one does.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from loraplex.registry.db import now
from loraplex.registry.errors import AlreadyExists, InvalidInput, NotFound

TENANT = "tenant"
ADMIN = "admin"

MAX_NAME_LENGTH = 64
# How long a rotated key keeps working by default (`loraplex key rotate`, the rotate routes):
# a day to roll the new key out; at most 30 days, so a forgotten old key does not live on.
DEFAULT_ROTATION_OVERLAP_S = 24 * 3600
MAX_ROTATION_OVERLAP_S = 30 * 24 * 3600
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
_KEY_PREFIX = "lpx"
_KEY_ID_BYTES = 8
_SECRET_BYTES = 32  # token_urlsafe(32): 256 bits, 43 characters
# Whatever arrives in an Authorization header is matched against this before anything else, so
# malformed input never reaches the database or an encoder.
_KEY_RE = re.compile(
    rf"{_KEY_PREFIX}_(?P<key_id>[0-9a-f]{{{2 * _KEY_ID_BYTES}}})_(?P<secret>[A-Za-z0-9_-]{{43}})"
)


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    created_at: str


@dataclass(frozen=True)
class Principal:
    """Who is calling, as established by authenticate()."""

    key_id: str
    role: str  # TENANT or ADMIN
    tenant_id: int | None  # None for admin keys
    tenant_name: str | None


@dataclass(frozen=True)
class KeyInfo:
    """A key as listed: never its secret nor its hash."""

    key_id: str
    role: str
    tenant_name: str | None
    created_at: str
    revoked_at: str | None
    expires_at: str | None = None  # set by rotation; the key fails from then on

    def is_usable(self, at: str) -> bool:
        """Whether the key authenticates at time `at` (db.now()'s format)."""
        return self.revoked_at is None and (self.expires_at is None or at < self.expires_at)


def check_name(kind: str, name: str) -> None:
    """Tenant and adapter names: 1-64 of a-z 0-9 . _ -, starting with a letter or digit."""
    if not (isinstance(name, str) and len(name) <= MAX_NAME_LENGTH and _NAME_RE.fullmatch(name)):
        raise InvalidInput(
            f"invalid {kind} name {name!r}: use 1-{MAX_NAME_LENGTH} characters of a-z, 0-9, "
            "'.', '_' and '-', starting with a letter or digit"
        )


def create_tenant(conn: sqlite3.Connection, name: str) -> Tenant:
    check_name("tenant", name)
    created_at = now()
    try:
        cursor = conn.execute(
            "INSERT INTO tenants (name, created_at) VALUES (?, ?)", (name, created_at)
        )
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"tenant '{name}' already exists") from None
    return Tenant(cursor.lastrowid, name, created_at)


def get_tenant(conn: sqlite3.Connection, name: str) -> Tenant:
    row = conn.execute(
        "SELECT id, name, created_at FROM tenants WHERE name = ?", (name,)
    ).fetchone()
    if row is None:
        raise NotFound(f"tenant '{name}' does not exist")
    return Tenant(row["id"], row["name"], row["created_at"])


def list_tenants(conn: sqlite3.Connection) -> list[Tenant]:
    rows = conn.execute("SELECT id, name, created_at FROM tenants ORDER BY name")
    return [Tenant(row["id"], row["name"], row["created_at"]) for row in rows]


def create_key(conn: sqlite3.Connection, role: str, tenant_id: int | None) -> tuple[str, str]:
    """A new key for a tenant (or an admin key, tenant_id None): (key_id, key)."""
    key_id = secrets.token_hex(_KEY_ID_BYTES)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    conn.execute(
        "INSERT INTO api_keys (key_id, role, tenant_id, secret_sha256, created_at)"
        " VALUES (?, ?, ?, ?, ?)",
        (key_id, role, tenant_id, _hash(secret), now()),
    )
    return key_id, f"{_KEY_PREFIX}_{key_id}_{secret}"


def authenticate(conn: sqlite3.Connection, key: str) -> Principal | None:
    """The principal a key belongs to; None for any key that is malformed, unknown or revoked."""
    match = _KEY_RE.fullmatch(key) if isinstance(key, str) else None
    if match is None:
        return None
    row = conn.execute(
        "SELECT k.key_id, k.role, k.tenant_id, k.secret_sha256, k.revoked_at, k.expires_at,"
        " t.name FROM api_keys k LEFT JOIN tenants t ON t.id = k.tenant_id WHERE k.key_id = ?",
        (match["key_id"],),
    ).fetchone()
    if row is None or row["revoked_at"] is not None:
        return None
    # Text comparison: every *_at column is ISO 8601 UTC in one format, which sorts as time.
    if row["expires_at"] is not None and now() >= row["expires_at"]:
        return None
    # Constant-time comparison: response timing must not tell how much of a guess was right.
    if not hmac.compare_digest(row["secret_sha256"], _hash(match["secret"])):
        return None
    return Principal(row["key_id"], row["role"], row["tenant_id"], row["name"])


def get_key(conn: sqlite3.Connection, key_id: str) -> KeyInfo:
    rows = _key_rows(conn, "k.key_id = ?", (key_id,))
    if not rows:
        raise NotFound(f"key '{key_id}' does not exist")
    return rows[0]


def revoke_key(conn: sqlite3.Connection, key_id: str) -> None:
    conn.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ?", (now(), key_id))


def expire_key(conn: sqlite3.Connection, key_id: str, overlap_s: int) -> str:
    """Make the key stop working `overlap_s` seconds from now (never later than an expiry it
    already has: rotating twice cannot extend a key's life); returns the expiry."""
    if not (isinstance(overlap_s, int) and 0 <= overlap_s <= MAX_ROTATION_OVERLAP_S):
        raise InvalidInput(f"the overlap must be 0 to {MAX_ROTATION_OVERLAP_S} seconds "
                           f"(30 days), got {overlap_s!r}")
    expires_at = (datetime.now(UTC) + timedelta(seconds=overlap_s)).isoformat(
        timespec="milliseconds")
    conn.execute("UPDATE api_keys SET expires_at = MIN(COALESCE(expires_at, ?), ?)"
                 " WHERE key_id = ?", (expires_at, expires_at, key_id))
    return get_key(conn, key_id).expires_at


def list_keys(conn: sqlite3.Connection, tenant_id: int | None) -> list[KeyInfo]:
    """A tenant's keys, or the admin keys when tenant_id is None; oldest first."""
    if tenant_id is None:
        return _key_rows(conn, "k.tenant_id IS NULL", ())
    return _key_rows(conn, "k.tenant_id = ?", (tenant_id,))


def _key_rows(conn: sqlite3.Connection, where: str, params: tuple) -> list[KeyInfo]:
    rows = conn.execute(
        "SELECT k.key_id, k.role, t.name AS tenant_name, k.created_at, k.revoked_at,"
        " k.expires_at"
        f" FROM api_keys k LEFT JOIN tenants t ON t.id = k.tenant_id WHERE {where}"
        # rowid is insertion order; created_at alone cannot order keys made in one millisecond.
        " ORDER BY k.rowid",
        params,
    )
    return [
        KeyInfo(r["key_id"], r["role"], r["tenant_name"], r["created_at"], r["revoked_at"],
                r["expires_at"])
        for r in rows
    ]


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()

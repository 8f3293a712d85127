"""Adapters (a tenant's named LoRA) and their versions (immutable artifacts, numbered v1, v2...).

A version row is written once and never updated (a trigger enforces it): a version id always
means the same weights, which is what lets the engine cache adapters by id.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from loraplex.registry.artifacts import Artifact, is_clear
from loraplex.registry.db import now
from loraplex.registry.errors import NotFound
from loraplex.registry.tenants import Tenant


@dataclass(frozen=True)
class Version:
    id: int  # global; the engine's adapter id
    adapter_name: str
    number: int  # 1, 2, 3... within the adapter
    sha256: str
    artifact_path: Path  # absolute
    size_bytes: int
    rank: int | None  # None if pushed without validation
    target_modules: tuple[str, ...] | None
    created_at: str
    created_by: str
    training_record: dict | None

    @property
    def label(self) -> str:
        return label(self.number)


def label(number: int) -> str:
    """How users see a version number: 3 -> "v3"."""
    return f"v{number}"


@dataclass(frozen=True)
class Adapter:
    id: int
    tenant_id: int
    tenant_name: str
    name: str
    created_at: str

    @property
    def description(self) -> str:
        """How errors name it: "adapter 'support-bot' of tenant 'acme'"."""
        return describe(self.tenant_name, self.name)


def describe(tenant_name: str, adapter_name: str) -> str:
    return f"adapter '{adapter_name}' of tenant '{tenant_name}'"


def find_adapter_id(conn: sqlite3.Connection, tenant_id: int, name: str) -> int | None:
    row = conn.execute(
        "SELECT id FROM adapters WHERE tenant_id = ? AND name = ?", (tenant_id, name)
    ).fetchone()
    return None if row is None else row["id"]


def get_adapter(conn: sqlite3.Connection, tenant: Tenant, name: str) -> Adapter:
    row = conn.execute(
        "SELECT id, created_at FROM adapters WHERE tenant_id = ? AND name = ?", (tenant.id, name)
    ).fetchone()
    if row is None:
        raise NotFound(f"{describe(tenant.name, name)} does not exist")
    return Adapter(row["id"], tenant.id, tenant.name, name, row["created_at"])


def list_adapter_names(conn: sqlite3.Connection, tenant_id: int) -> list[str]:
    rows = conn.execute("SELECT name FROM adapters WHERE tenant_id = ? ORDER BY name", (tenant_id,))
    return [row["name"] for row in rows]


def insert_version(
    conn: sqlite3.Connection,
    tenant_id: int,
    adapter_name: str,
    artifact: Artifact,
    *,
    actor: str,
    training_record: dict | None,
    home: Path,
) -> Version:
    """Add the next version of an adapter, creating the adapter on its first version."""
    adapter_id = find_adapter_id(conn, tenant_id, adapter_name)
    created_at = now()
    if adapter_id is None:
        adapter_id = conn.execute(
            "INSERT INTO adapters (tenant_id, name, created_at) VALUES (?, ?, ?)",
            (tenant_id, adapter_name, created_at),
        ).lastrowid
    (number,) = conn.execute(
        "SELECT COALESCE(MAX(number), 0) + 1 FROM versions WHERE adapter_id = ?", (adapter_id,)
    ).fetchone()
    target_modules = None if artifact.target_modules is None else list(artifact.target_modules)
    version_id = conn.execute(
        "INSERT INTO versions (adapter_id, number, sha256, artifact_path, size_bytes, rank,"
        " target_modules, created_at, created_by, training_record)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            adapter_id,
            number,
            artifact.sha256,
            artifact.path,
            artifact.size_bytes,
            artifact.rank,
            _to_json(target_modules),
            created_at,
            actor,
            _to_json(training_record),
        ),
    ).lastrowid
    return _version(
        conn.execute(f"{_SELECT_VERSION} WHERE v.id = ?", (version_id,)).fetchone(), home
    )


def list_versions(conn: sqlite3.Connection, adapter_id: int, home: Path) -> list[Version]:
    rows = conn.execute(
        f"{_SELECT_VERSION} WHERE v.adapter_id = ? ORDER BY v.number", (adapter_id,)
    )
    return [_version(row, home) for row in rows]


def clear_artifacts(conn: sqlite3.Connection) -> list[tuple[int, str, str]]:
    """(version id, tenant name, artifact path) of versions whose artifact is in clear."""
    rows = conn.execute(
        "SELECT v.id, t.name, v.artifact_path FROM versions v JOIN adapters a"
        " ON a.id = v.adapter_id JOIN tenants t ON t.id = a.tenant_id ORDER BY v.id")
    return [(r[0], r[1], r[2]) for r in rows if is_clear(r["artifact_path"])]


def move_artifact(conn: sqlite3.Connection, version_id: int, relative: str) -> tuple[str, int]:
    """Point a version at `relative` (see m006_sealed_artifacts); returns (the path it had, its
    tenant id)."""
    row = conn.execute("SELECT v.artifact_path, a.tenant_id FROM versions v JOIN adapters a"
                       " ON a.id = v.adapter_id WHERE v.id = ?", (version_id,)).fetchone()
    conn.execute("UPDATE versions SET artifact_path = ? WHERE id = ?", (relative, version_id))
    return row["artifact_path"], row["tenant_id"]


def version_by_number(versions: list[Version], number: int, where: str) -> Version:
    """The version `number` among an adapter's versions; `where` names the adapter in errors."""
    for version in versions:
        if version.number == number:
            return version
    known = ", ".join(version.label for version in versions)
    raise NotFound(f"{where} has no version {label(number)}; versions: {known}")


_SELECT_VERSION = (
    "SELECT v.id, a.name AS adapter_name, v.number, v.sha256, v.artifact_path, v.size_bytes,"
    " v.rank, v.target_modules, v.created_at, v.created_by, v.training_record"
    " FROM versions v JOIN adapters a ON a.id = v.adapter_id"
)


def _version(row: sqlite3.Row, home: Path) -> Version:
    target_modules = _from_json(row["target_modules"])
    return Version(
        id=row["id"],
        adapter_name=row["adapter_name"],
        number=row["number"],
        sha256=row["sha256"],
        artifact_path=home / row["artifact_path"],
        size_bytes=row["size_bytes"],
        rank=row["rank"],
        target_modules=None if target_modules is None else tuple(target_modules),
        created_at=row["created_at"],
        created_by=row["created_by"],
        training_record=_from_json(row["training_record"]),
    )


def _to_json(value: object) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _from_json(text: str | None) -> object:
    return None if text is None else json.loads(text)

"""The audit log: who changed what, when. Append-only.

Each entry is written in the same transaction as the change it describes, so the log never
claims a change that did not happen nor misses one that did. There is no update or delete here,
and triggers refuse both in the database.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass

from loraplex.registry.db import now


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: str
    actor: str
    action: str  # e.g. "tenant.create", "adapter.promote"
    target: str  # e.g. "acme", "acme/support-bot", "key:0f3a..."
    tenant_name: str | None  # the tenant concerned; None for operator-wide entries
    details: dict


def record(
    conn: sqlite3.Connection,
    actor: str,
    action: str,
    target: str,
    details: dict,
    *,
    tenant_id: int | None,
) -> None:
    conn.execute(
        "INSERT INTO audit (at, actor, action, target, tenant_id, details)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (now(), actor, action, target, tenant_id, json.dumps(details, sort_keys=True)),
    )


def list_entries(
    conn: sqlite3.Connection, limit: int, tenant_id: int | None = None
) -> list[AuditEntry]:
    """The newest `limit` entries, newest first; only one tenant's if tenant_id is given."""
    where, params = ("WHERE e.tenant_id = ?", (tenant_id,)) if tenant_id is not None else ("", ())
    rows = conn.execute(
        "SELECT e.id, e.at, e.actor, e.action, e.target, t.name AS tenant_name, e.details"
        f" FROM audit e LEFT JOIN tenants t ON t.id = e.tenant_id {where}"
        " ORDER BY e.id DESC LIMIT ?",
        (*params, limit),
    )
    return [
        AuditEntry(
            r["id"],
            r["at"],
            r["actor"],
            r["action"],
            r["target"],
            r["tenant_name"],
            json.loads(r["details"]),
        )
        for r in rows
    ]

"""Deployments: which versions serve an adapter name, and with what share of its users.

A split maps version id -> weight (positive ints summing to 100). Every change appends a row to
deployment_history; the newest row is the current split. Rollback appends the split that was
current before the newest row, so rolling back twice returns to where it started, and the
history stays a complete record of what served when.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass

from loraplex.registry.adapters import Version, label, version_by_number
from loraplex.registry.db import now
from loraplex.registry.errors import InvalidInput

TOTAL_WEIGHT = 100


@dataclass(frozen=True)
class Deployment:
    """One entry of an adapter's deployment history, as users read it."""

    seq: int  # 1, 2, 3... within the adapter
    split: dict[int, int]  # version number -> weight
    created_at: str
    actor: str


def history(conn: sqlite3.Connection, adapter_id: int, versions: list[Version]) -> list[Deployment]:
    """An adapter's deployments, oldest first; the last one is current."""
    rows = conn.execute(
        "SELECT seq, split, created_at, actor FROM deployment_history"
        " WHERE adapter_id = ? ORDER BY seq",
        (adapter_id,),
    )
    return [
        Deployment(r["seq"], by_number(versions, _load(r["split"])), r["created_at"], r["actor"])
        for r in rows
    ]


def current_split(conn: sqlite3.Connection, adapter_id: int) -> dict[int, int]:
    """version id -> weight; empty if the adapter was never deployed."""
    row = conn.execute(
        "SELECT split FROM deployment_history WHERE adapter_id = ? ORDER BY seq DESC LIMIT 1",
        (adapter_id,),
    ).fetchone()
    return {} if row is None else _load(row["split"])


def deploy(conn: sqlite3.Connection, adapter_id: int, split: Mapping[int, int], actor: str) -> bool:
    """Make `split` current; False (and nothing recorded) if it already is."""
    if dict(split) == current_split(conn, adapter_id):
        return False
    conn.execute(
        "INSERT INTO deployment_history (adapter_id, seq, split, created_at, actor)"
        " SELECT ?, COALESCE(MAX(seq), 0) + 1, ?, ?, ? FROM deployment_history"
        " WHERE adapter_id = ?",
        (adapter_id, json.dumps(split, sort_keys=True), now(), actor, adapter_id),
    )
    return True


def previous_split(conn: sqlite3.Connection, adapter_id: int, where: str) -> dict[int, int]:
    """The split that was current before the latest change: what rollback restores."""
    rows = conn.execute(
        "SELECT split FROM deployment_history WHERE adapter_id = ? ORDER BY seq DESC LIMIT 2",
        (adapter_id,),
    ).fetchall()
    if len(rows) < 2:
        raise InvalidInput(f"{where} has no earlier deployment to roll back to")
    return _load(rows[1]["split"])


def split_by_id(versions: list[Version], weights: Mapping[int, int], where: str) -> dict[int, int]:
    """Check a split given by version number ({1: 90, 2: 10}); returns it by version id."""
    if not weights:
        raise InvalidInput(f"a split of {where} needs at least one version")
    for number, weight in weights.items():
        # bool is an int in Python; True as a weight is a bug in the caller, not 1%.
        if not isinstance(weight, int) or isinstance(weight, bool) or weight <= 0:
            raise InvalidInput(
                f"the weight of {label(number)} must be a positive integer, not {weight!r}"
            )
    total = sum(weights.values())
    if total != TOTAL_WEIGHT:
        raise InvalidInput(f"split weights must sum to {TOTAL_WEIGHT}, not {total}")
    return {version_by_number(versions, n, where).id: w for n, w in weights.items()}


def by_number(versions: list[Version], split: Mapping[int, int]) -> dict[int, int]:
    """A split by version id as users read it: version number -> weight, in version order."""
    number = {version.id: version.number for version in versions}
    return dict(sorted((number[version_id], weight) for version_id, weight in split.items()))


def _load(text: str) -> dict[int, int]:
    # JSON object keys are strings; version ids are ints everywhere else.
    return {int(version_id): weight for version_id, weight in json.loads(text).items()}

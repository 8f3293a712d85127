"""Resolving a request's model name to the version that serves it, once per request.

Deployments are cached in memory per adapter. The cache is valid for one value of the
`generation` counter, which every administrative change bumps in its own transaction. The
counter is re-read on every resolve (one primary-key SELECT on a one-row table, microseconds)
rather than on a timer: a change made by another process, such as the CLI, is seen by the very
next request, and there is no clock to reason about.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from loraplex.registry import deployments
from loraplex.registry.adapters import find_adapter_id
from loraplex.registry.errors import NotFound
from loraplex.registry.splits import choose_version


@dataclass(frozen=True)
class ResolvedVersion:
    version_id: int  # the engine's adapter id
    number: int
    artifact_path: Path  # absolute
    adapter_name: str


@dataclass(frozen=True)
class _CachedDeployment:
    adapter_id: int
    split: dict[int, int]  # version id -> weight
    versions: dict[int, tuple[int, Path]]  # version id -> (number, absolute artifact path)


def split_pinned(model: str) -> tuple[str, int | None]:
    """("support", 3) for "support:v3", a name pinned to one version whatever the split (what
    a fine-tuning job reports as its model, and how an operator tries a version before moving
    traffic); ("support", None) for a plain name. Names cannot hold ':', so this is unambiguous."""
    name, colon, version = model.partition(":")
    if colon and version[:1] == "v" and version[1:].isdigit():
        return name, int(version[1:])
    return model, None


def bump_generation(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE generation SET value = value + 1 WHERE id = 1")


def read_generation(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT value FROM generation WHERE id = 1").fetchone()["value"]


class Resolver:
    """Not thread-safe by itself: the Registry facade calls it under its lock."""

    def __init__(self, home: Path):
        self._home = home
        self._generation = -1  # never a stored value: the first resolve loads from the database
        # (tenant id, adapter name) -> deployment. Only adapters that exist are cached, so the
        # cache cannot be grown by requests for made-up names.
        self._cache: dict[tuple[int, str], _CachedDeployment] = {}

    def resolve(
        self, conn: sqlite3.Connection, tenant_id: int, adapter_name: str, user: str
    ) -> ResolvedVersion:
        """The version serving `user` on the tenant's adapter.

        NotFound has the same message whether the adapter is missing or another tenant's, so a
        caller cannot learn which names other tenants use.
        """
        generation = read_generation(conn)
        if generation != self._generation:
            self._cache.clear()
            self._generation = generation
        name, pinned = split_pinned(adapter_name)
        key = (tenant_id, name)
        deployment = self._cache.get(key) or self._load(conn, tenant_id, name)
        if deployment is None:
            raise NotFound(f"adapter '{adapter_name}' does not exist")
        self._cache[key] = deployment
        if pinned is None:
            version_id = choose_version(deployment.split, user,
                                        salt=f"adapter-{deployment.adapter_id}")
        else:
            version_id = next((v for v, (number, _) in deployment.versions.items()
                               if number == pinned), None)
            if version_id is None:
                raise NotFound(f"adapter '{adapter_name}' does not exist")
        number, artifact_path = deployment.versions[version_id]
        return ResolvedVersion(version_id, number, artifact_path, name)

    def _load(
        self, conn: sqlite3.Connection, tenant_id: int, adapter_name: str
    ) -> _CachedDeployment | None:
        adapter_id = find_adapter_id(conn, tenant_id, adapter_name)
        if adapter_id is None:
            return None
        split = deployments.current_split(conn, adapter_id)
        rows = conn.execute(
            "SELECT id, number, artifact_path FROM versions WHERE adapter_id = ?", (adapter_id,)
        )
        # A version whose artifact is gone (its tenant's data was crypto-shredded) no longer
        # resolves: checked when a deployment loads (each generation), not per request.
        versions = {r["id"]: (r["number"], self._home / r["artifact_path"]) for r in rows
                    if (self._home / r["artifact_path"]).is_dir()}
        split = {version_id: weight for version_id, weight in split.items()
                 if version_id in versions}
        if not split:
            return None
        return _CachedDeployment(adapter_id, split, versions)

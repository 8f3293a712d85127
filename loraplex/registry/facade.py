"""Registry: the one object the server and the CLI use to read and change a loraplex home.

It owns one SQLite connection, shared by the server's threads, and a lock around every use of
it: a connection has a single transaction state, so without the lock one thread could read
another's uncommitted rows, or commit them half-way. Each administrative operation is one
transaction that makes the change, appends its audit entry and bumps the deployment
generation, so all three happen or none does.

Tenants and adapters are named by name here (the CLI's and the admin API's vocabulary);
resolve() takes the tenant id from an authenticated Principal, as the server has it.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loraplex.registry import adapters, audit, deployments, ledger, quotas, stats, tenants
from loraplex.registry.adapters import Adapter, Version, label, version_by_number
from loraplex.registry.artifacts import Sealer, Validate, remove_abandoned, store_artifact
from loraplex.registry.audit import AuditEntry
from loraplex.registry.db import connect, now, transaction
from loraplex.registry.deployments import Deployment
from loraplex.registry.errors import InvalidInput, NotFound
from loraplex.registry.quotas import Quota
from loraplex.registry.resolver import ResolvedVersion, Resolver, bump_generation
from loraplex.registry.tenants import (
    ADMIN,
    DEFAULT_ROTATION_OVERLAP_S,
    TENANT,
    KeyInfo,
    Principal,
    Tenant,
)


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    created_at: str
    versions: list[Version]  # oldest first
    split: dict[int, int]  # version number -> weight; the current deployment
    active: int  # the version number most users get (highest weight; the newest on a tie)


class Registry:
    def __init__(self, home: Path):
        self.home = Path(home)
        self._conn = connect(self.home)
        self._lock = threading.Lock()
        remove_abandoned(self.home)  # what pushes killed midway left (artifacts.py)
        self._resolver = Resolver(self.home)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- tenants and keys ------------------------------------------------------------------

    def create_tenant(self, name: str, *, actor: str) -> Tenant:
        with self._change() as conn:
            tenant = tenants.create_tenant(conn, name)
            audit.record(conn, actor, "tenant.create", name, {}, tenant_id=tenant.id)
        return tenant

    def set_base_model_access(self, tenant: str, allowed: bool, *, actor: str) -> None:
        """Let a tenant call the bare base model by its name (or stop it)."""
        with self._change() as conn:
            tenant_id = tenants.get_tenant(conn, tenant).id
            if allowed:
                conn.execute("INSERT OR IGNORE INTO base_model_access VALUES (?)", (tenant_id,))
            else:
                conn.execute("DELETE FROM base_model_access WHERE tenant_id = ?", (tenant_id,))
            audit.record(conn, actor, "tenant.base_model_access", tenant, {"allowed": allowed},
                         tenant_id=tenant_id)

    def tenant_may_use_base(self, tenant_id: int) -> bool:
        with self._read() as conn:
            row = conn.execute("SELECT 1 FROM base_model_access WHERE tenant_id = ?",
                               (tenant_id,)).fetchone()
        return row is not None

    def get_tenant(self, name: str) -> Tenant:
        with self._read() as conn:
            return tenants.get_tenant(conn, name)

    def list_tenants(self) -> list[Tenant]:
        with self._read() as conn:
            return tenants.list_tenants(conn)

    def create_key(self, tenant: str, *, actor: str) -> tuple[str, str]:
        """A new API key for the tenant: (key_id, key). The key is shown once; keep it."""
        with self._change() as conn:
            tenant_id = tenants.get_tenant(conn, tenant).id
            key_id, key = tenants.create_key(conn, TENANT, tenant_id)
            audit.record(conn, actor, "key.create", f"key:{key_id}", {}, tenant_id=tenant_id)
        return key_id, key

    def create_admin_key(self, *, actor: str) -> tuple[str, str]:
        """A new admin key: (key_id, key). The key is shown once; keep it."""
        with self._change() as conn:
            key_id, key = tenants.create_key(conn, ADMIN, None)
            audit.record(conn, actor, "admin_key.create", f"key:{key_id}", {}, tenant_id=None)
        return key_id, key

    def authenticate(self, key: str) -> Principal | None:
        """Who holds `key`; None for anything that is not a valid, unrevoked key."""
        with self._read() as conn:
            return tenants.authenticate(conn, key)

    def revoke_key(self, key_id: str, *, actor: str, tenant: str | None = None) -> KeyInfo:
        """Revoke a key; with `tenant`, only one of that tenant's keys. Revoking twice is a no-op.

        A key of another tenant is reported exactly like a missing one.
        """
        with self._change() as conn:
            key = tenants.get_key(conn, key_id)
            if tenant is not None and key.tenant_name != tenant:
                raise NotFound(f"key '{key_id}' does not exist")
            if key.revoked_at is not None:
                return key
            tenants.revoke_key(conn, key_id)
            tenant_id = None if key.role == ADMIN else tenants.get_tenant(conn, key.tenant_name).id
            audit.record(
                conn, actor, "key.revoke", f"key:{key_id}", {"role": key.role}, tenant_id=tenant_id
            )
            return tenants.get_key(conn, key_id)

    def rotate_key(self, key_id: str, *, actor: str, overlap_s: int = DEFAULT_ROTATION_OVERLAP_S,
                   tenant: str | None = None) -> tuple[str, str, KeyInfo]:
        """Replace a key: a new one of the same role and tenant, (new key_id, new key, the old
        key as it is now); the old one keeps working for `overlap_s` seconds, then expires.
        With `tenant`, only one of that tenant's keys (another's is reported as missing)."""
        with self._change() as conn:
            old = tenants.get_key(conn, key_id)
            if tenant is not None and old.tenant_name != tenant:
                raise NotFound(f"key '{key_id}' does not exist")
            if not old.is_usable(now()):
                raise InvalidInput(f"key '{key_id}' is revoked or expired; create a new key")
            tenant_id = None if old.role == ADMIN else tenants.get_tenant(conn, old.tenant_name).id
            new_id, new_key = tenants.create_key(conn, old.role, tenant_id)
            expires_at = tenants.expire_key(conn, key_id, overlap_s)
            audit.record(conn, actor, "key.rotate", f"key:{key_id}",
                         {"role": old.role, "new_key": new_id, "old_expires_at": expires_at},
                         tenant_id=tenant_id)
            return new_id, new_key, tenants.get_key(conn, key_id)

    def list_keys(self, tenant: str) -> list[KeyInfo]:
        with self._read() as conn:
            return tenants.list_keys(conn, tenants.get_tenant(conn, tenant).id)

    def list_admin_keys(self) -> list[KeyInfo]:
        with self._read() as conn:
            return tenants.list_keys(conn, None)

    # -- adapters, versions and deployments ------------------------------------------------

    def push_version(
        self,
        tenant: str,
        adapter_name: str,
        src_dir: Path,
        *,
        actor: str,
        validate: Validate | None,
        sealer: Sealer,
        promote: bool = False,
        training_record: dict | None = None,
    ) -> Version:
        """Store the adapter in src_dir as the adapter's next version (v1 creates the adapter).

        Only adapter_config.json and adapter_model.safetensors are read. validate(files)
        returns {"rank": int, "target_modules": [...]} or raises ValueError to refuse the
        adapter (raised here as InvalidInput with its message). `sealer` encrypts the files
        under the tenant's key (the vault's ArtifactSealer); nothing is stored in clear. The
        first version is deployed at once; later ones only with promote=True.
        """
        tenants.check_name("adapter", adapter_name)
        self.get_tenant(tenant)  # fail before copying anything
        # Outside the lock: copying and validating may take seconds, and requests must not wait.
        artifact = store_artifact(self.home, tenant, Path(src_dir), validate, sealer)
        with self._change() as conn:
            tenant_id = tenants.get_tenant(conn, tenant).id
            version = adapters.insert_version(
                conn,
                tenant_id,
                adapter_name,
                artifact,
                actor=actor,
                training_record=training_record,
                home=self.home,
            )
            adapter_id = adapters.find_adapter_id(conn, tenant_id, adapter_name)
            # The first version is deployed at once, so a new adapter serves right away.
            promoted = promote or not deployments.current_split(conn, adapter_id)
            if promoted:
                deployments.deploy(conn, adapter_id, {version.id: 100}, actor)
            details = {"version": version.label, "sha256": artifact.sha256, "promoted": promoted}
            audit.record(
                conn,
                actor,
                "adapter.push",
                f"{tenant}/{adapter_name}",
                details,
                tenant_id=tenant_id,
            )
        return version

    def promote(self, tenant: str, name: str, number: int, *, actor: str) -> dict[int, int]:
        """Serve version `number` to everyone; returns the split (version number -> weight)."""
        with self._change() as conn:
            adapter, versions = self._adapter(conn, tenant, name)
            version = version_by_number(versions, number, adapter.description)
            return self._deploy(
                conn, adapter, versions, {version.id: 100}, actor, "adapter.promote"
            )

    def split(
        self, tenant: str, name: str, weights: Mapping[int, int], *, actor: str
    ) -> dict[int, int]:
        """Split traffic by version number, e.g. {1: 90, 2: 10}; weights sum to 100."""
        with self._change() as conn:
            adapter, versions = self._adapter(conn, tenant, name)
            split = deployments.split_by_id(versions, weights, adapter.description)
            return self._deploy(conn, adapter, versions, split, actor, "adapter.split")

    def rollback(self, tenant: str, name: str, *, actor: str) -> dict[int, int]:
        """Restore the split current before the latest change; returns it (by version number)."""
        with self._change() as conn:
            adapter, versions = self._adapter(conn, tenant, name)
            split = deployments.previous_split(conn, adapter.id, adapter.description)
            return self._deploy(conn, adapter, versions, split, actor, "adapter.rollback")

    def clear_artifacts(self) -> list[tuple[int, str, str]]:
        """(version id, tenant, artifact path) of each version whose artifact was stored in
        clear, before sealing (seal_clear_artifacts in vault/artifacts.py moves them)."""
        with self._read() as conn:
            return adapters.clear_artifacts(conn)

    def move_to_sealed(self, version_id: int, relative: str, *, actor: str) -> None:
        """Point a version at the sealed copy of its clear artifact (the same sha256: a
        trigger allows this one move and no other change)."""
        with self._change() as conn:
            before, tenant_id = adapters.move_artifact(conn, version_id, relative)
            audit.record(conn, actor, "artifact.seal", f"version:{version_id}",
                         {"from": before, "to": relative}, tenant_id=tenant_id)

    def resolve(self, tenant_id: int, adapter_name: str, user: str) -> ResolvedVersion:
        """The version that serves this user of the tenant's adapter (called per request).

        Raises NotFound with one message whether the adapter is missing or another tenant's.
        """
        with self._read() as conn:
            return self._resolver.resolve(conn, tenant_id, adapter_name, user)

    def list_adapters(self, tenant: str) -> list[AdapterInfo]:
        with self._read() as conn:
            tenant_row = tenants.get_tenant(conn, tenant)
            names = adapters.list_adapter_names(conn, tenant_row.id)
            return [self._adapter_info(conn, *self._adapter(conn, tenant, name)) for name in names]

    def show_adapter(self, tenant: str, name: str) -> AdapterInfo:
        """One adapter, its versions with their training records, and its current split."""
        with self._read() as conn:
            return self._adapter_info(conn, *self._adapter(conn, tenant, name))

    def deployment_history(self, tenant: str, name: str) -> list[Deployment]:
        with self._read() as conn:
            adapter, versions = self._adapter(conn, tenant, name)
            return deployments.history(conn, adapter.id, versions)

    def get_version(self, tenant: str, name: str, number: int) -> Version:
        with self._read() as conn:
            adapter, versions = self._adapter(conn, tenant, name)
            return version_by_number(versions, number, adapter.description)

    # -- counters --------------------------------------------------------------------------

    def record_request(
        self,
        version_id: int,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        latency_ms: float,
        ttft_ms: float,
        error: bool,
    ) -> None:
        """Count one finished request against the version that served it."""
        with self._lock:  # one statement, so it commits on its own; no generation bump
            stats.record_request(
                self._conn,
                version_id,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                latency_ms=latency_ms,
                ttft_ms=ttft_ms,
                error=error,
            )

    def version_stats(self, tenant: str, name: str) -> list[dict]:
        """Counters and means per version of the adapter; see stats.version_stats."""
        with self._read() as conn:
            adapter, _ = self._adapter(conn, tenant, name)
            return stats.version_stats(conn, adapter.id)

    # -- quotas and the usage ledger ---------------------------------------------------------

    def set_quota(self, tenant: str, *, actor: str, **changes) -> Quota:
        """Change some of a tenant's quota fields (see quotas.Quota; None lifts a limit)."""
        unknown = set(changes) - set(Quota.__dataclass_fields__)
        if unknown:
            raise InvalidInput(f"unknown quota field(s): {', '.join(sorted(unknown))}")
        with self._change() as conn:
            tenant_id = tenants.get_tenant(conn, tenant).id
            quota = quotas.check(Quota(**vars(quotas.get_quota(conn, tenant_id)) | changes))
            quotas.set_quota(conn, tenant_id, quota)
            audit.record(conn, actor, "tenant.quota", tenant, changes, tenant_id=tenant_id)
        return quota

    def get_quota(self, tenant: str) -> Quota:
        with self._read() as conn:
            return quotas.get_quota(conn, tenants.get_tenant(conn, tenant).id)

    def quota_of(self, tenant_id: int) -> Quota:
        """get_quota by id, as the server has it per request."""
        with self._read() as conn:
            return quotas.get_quota(conn, tenant_id)

    def add_usage(self, batch: dict[ledger.UsageKey, tuple[int, ...]]) -> None:
        """Add a batch of usage to the ledger in one transaction (LedgerWriter calls this)."""
        with self._lock, transaction(self._conn):  # no generation bump: nothing deployed changed
            ledger.add(self._conn, batch)

    def usage(self, tenant: str, *, start: str | None = None, end: str | None = None,
              group_by: str = "day") -> list[dict]:
        """The tenant's usage over hours [start, end) (ledger.parse_time's formats), grouped by
        key, adapter, version, day or hour."""
        start = None if start is None else ledger.parse_time(start, "from")
        end = None if end is None else ledger.parse_time(end, "to")
        with self._read() as conn:
            return ledger.query(conn, tenants.get_tenant(conn, tenant).id, start, end, group_by)

    def recently_used_adapters(self, limit: int) -> list[tuple[str, str]]:
        """(tenant, adapter) that served most recently first (from the ledger)."""
        with self._read() as conn:
            return ledger.recently_used(conn, limit)

    def tokens_between(self, tenant_id: int, start: str, end: str) -> int:
        with self._read() as conn:
            return ledger.tokens_between(conn, tenant_id, start, end)

    # -- audit -----------------------------------------------------------------------------

    def record_audit(
        self, actor: str, action: str, target: str, details: dict, tenant: str | None = None
    ) -> None:
        """Record an administrative action done outside the registry (data upload, training,
        export) in the same append-only log."""
        with self._change() as conn:
            tenant_id = None if tenant is None else tenants.get_tenant(conn, tenant).id
            audit.record(conn, actor, action, target, details, tenant_id=tenant_id)

    def audit_log(self, limit: int = 100, tenant: str | None = None) -> list[AuditEntry]:
        """The newest entries first; only those concerning `tenant` if given."""
        with self._read() as conn:
            tenant_id = None if tenant is None else tenants.get_tenant(conn, tenant).id
            return audit.list_entries(conn, limit, tenant_id)

    # -- helpers ---------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self._conn, write=False):
            yield self._conn

    @contextmanager
    def _change(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self._conn):
            yield self._conn
            bump_generation(self._conn)

    def _adapter(
        self, conn: sqlite3.Connection, tenant: str, name: str
    ) -> tuple[Adapter, list[Version]]:
        adapter = adapters.get_adapter(conn, tenants.get_tenant(conn, tenant), name)
        return adapter, adapters.list_versions(conn, adapter.id, self.home)

    def _adapter_info(
        self, conn: sqlite3.Connection, adapter: Adapter, versions: list[Version]
    ) -> AdapterInfo:
        split = deployments.by_number(versions, deployments.current_split(conn, adapter.id))
        active = max(split, key=lambda number: (split[number], number))
        return AdapterInfo(adapter.name, adapter.created_at, versions, split, active)

    def _deploy(
        self,
        conn: sqlite3.Connection,
        adapter: Adapter,
        versions: list[Version],
        split: dict[int, int],
        actor: str,
        action: str,
    ) -> dict[int, int]:
        """Make `split` (by version id) current and audit it; a no-op if it already is."""
        split_by_number = deployments.by_number(versions, split)
        if deployments.deploy(conn, adapter.id, split, actor):
            details = {"split": {label(n): w for n, w in split_by_number.items()}}
            target = f"{adapter.tenant_name}/{adapter.name}"
            audit.record(conn, actor, action, target, details, tenant_id=adapter.tenant_id)
        return split_by_number

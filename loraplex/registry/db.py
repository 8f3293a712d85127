"""The registry database: one SQLite file per loraplex home, and its migrations.

Migrations are an append-only list of named functions. A released migration is never edited:
a schema change is a new function at the end of MIGRATIONS, so every home, old or new, ends up
with the same schema (tests/registry/test_db.py pins it).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

DB_FILE = "registry.sqlite3"


def connect(home: Path) -> sqlite3.Connection:
    """Open (creating and migrating if needed) the registry database of `home`."""
    home.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: no implicit transactions; every write goes through transaction(),
    # so what is atomic is spelled out where it happens. check_same_thread=False: the server
    # shares one connection between threads, and the Registry facade serialises its use.
    conn = sqlite3.connect(home / DB_FILE, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    # A CLI process may write while the server holds the file open: wait for its lock rather
    # than failing at once, and use WAL so readers never block on that writer.
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA foreign_keys = ON")
    migrate(conn)
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection, *, write: bool = True) -> Iterator[None]:
    """All statements inside commit together or not at all, and read one snapshot.

    write=True begins IMMEDIATE: it takes the write lock up front, so two processes that read
    then write (e.g. the next version number) cannot interleave. A read-only transaction
    still matters: reads of several tables agree with each other even if another process
    commits in between.
    """
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield
    except BaseException:
        # SQLite rolls back by itself after some failures (SQLITE_FULL: a full disk); a second
        # ROLLBACK would then replace that error with "no transaction is active".
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def now() -> str:
    """The current UTC time as stored in every `*_at` column (ISO 8601, sorts as text)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def migrate(conn: sqlite3.Connection) -> None:
    """Apply, in order, each migration not applied yet; each one in its own transaction."""
    with transaction(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS _migrations"
            " (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
    for migration in MIGRATIONS:
        with transaction(conn):
            # Checked inside the transaction: another process may have applied it meanwhile.
            applied = conn.execute(
                "SELECT 1 FROM _migrations WHERE name = ?", (migration.__name__,)
            ).fetchone()
            if applied is None:
                migration(conn)
                conn.execute(
                    "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                    (migration.__name__, now()),
                )


def m001_initial(conn: sqlite3.Connection) -> None:
    statements = [
        """CREATE TABLE tenants (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
)""",
        # One table for tenant keys and admin keys: authentication is the same lookup for both.
        # Only the sha256 of a key's secret is stored, so a copy of the database grants nothing.
        """CREATE TABLE api_keys (
    key_id TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('tenant', 'admin')),
    tenant_id INTEGER REFERENCES tenants (id),
    secret_sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL,
    revoked_at TEXT,
    CHECK ((role = 'admin') = (tenant_id IS NULL))
)""",
        "CREATE INDEX api_keys_tenant ON api_keys (tenant_id)",
        """CREATE TABLE adapters (
    id INTEGER PRIMARY KEY,
    tenant_id INTEGER NOT NULL REFERENCES tenants (id),
    name TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (tenant_id, name)
)""",
        # id is the engine's adapter id. AUTOINCREMENT: an id is never handed out twice, even if
        # versions are deleted one day, so an engine cache keyed by id can never serve stale
        # weights under a reused id.
        """CREATE TABLE versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    adapter_id INTEGER NOT NULL REFERENCES adapters (id),
    number INTEGER NOT NULL CHECK (number >= 1),
    sha256 TEXT NOT NULL,
    artifact_path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    rank INTEGER,
    target_modules TEXT,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    training_record TEXT,
    UNIQUE (adapter_id, number)
)""",
        """CREATE TRIGGER versions_are_immutable BEFORE UPDATE ON versions
BEGIN
    SELECT RAISE(ABORT, 'versions are immutable');
END""",
        # The current split of an adapter is its row with the highest seq; older rows are what
        # rollback restores. split: JSON object {version id: weight}.
        """CREATE TABLE deployment_history (
    adapter_id INTEGER NOT NULL REFERENCES adapters (id),
    seq INTEGER NOT NULL,
    split TEXT NOT NULL,
    created_at TEXT NOT NULL,
    actor TEXT NOT NULL,
    PRIMARY KEY (adapter_id, seq)
)""",
        # Bumped by every change to adapters, versions or deployments; a running server compares
        # it to drop its cached deployments when another process (the CLI) changed them.
        """CREATE TABLE generation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
)""",
        "INSERT INTO generation (id, value) VALUES (1, 0)",
        """CREATE TABLE version_stats (
    version_id INTEGER PRIMARY KEY REFERENCES versions (id),
    requests INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_ms_sum REAL NOT NULL,
    ttft_ms_sum REAL NOT NULL
)""",
        # tenant_id: the tenant an entry concerns (NULL for operator-wide ones like admin keys),
        # so a tenant's history can be listed without parsing targets.
        """CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    tenant_id INTEGER REFERENCES tenants (id),
    details TEXT NOT NULL
)""",
        "CREATE INDEX audit_tenant ON audit (tenant_id, id)",
        """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END""",
        """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END""",
    ]
    for statement in statements:
        conn.execute(statement)


def m002_base_model_access(conn: sqlite3.Connection) -> None:
    """Tenants allowed to call the bare base model (by default a tenant sees only its own
    adapters)."""
    conn.execute(
        """CREATE TABLE base_model_access (
    tenant_id INTEGER PRIMARY KEY REFERENCES tenants (id)
)"""
    )


def m003_quotas_and_ledger(conn: sqlite3.Connection) -> None:
    """Per-tenant quotas and fairness tier, and the usage ledger billing reads."""
    # NULL in a limit column: no limit of that kind (the server's default for max_concurrent).
    conn.execute(
        """CREATE TABLE quotas (
    tenant_id INTEGER PRIMARY KEY REFERENCES tenants (id),
    tier REAL NOT NULL CHECK (tier > 0),
    requests_per_minute INTEGER CHECK (requests_per_minute > 0),
    tokens_per_minute INTEGER CHECK (tokens_per_minute > 0),
    max_concurrent INTEGER CHECK (max_concurrent > 0),
    monthly_tokens INTEGER CHECK (monthly_tokens > 0)
)"""
    )
    # One row per (tenant, key, adapter, version, UTC hour); the server adds to rows in batches.
    # adapter and version are names as billed ("support-bot", "v2"; the base model's name and
    # "base"), kept as text so that a bill stays readable whatever happens to the adapter later.
    conn.execute(
        """CREATE TABLE usage (
    tenant_id INTEGER NOT NULL REFERENCES tenants (id),
    key_id TEXT NOT NULL,
    adapter TEXT NOT NULL,
    version TEXT NOT NULL,
    hour TEXT NOT NULL,
    requests INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_prompt_tokens INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, hour, key_id, adapter, version)
)"""
    )


def m004_fine_tuning_api(conn: sqlite3.Connection) -> None:
    """The OpenAI-style fine-tuning API: jobs with their events and checkpoints, webhook
    endpoints and their deliveries, and whether a tenant's fine-tuned versions serve at once.

    A job, event or checkpoint is one JSON object as the API shows it (`body`), beside the
    columns it is looked up by; `seq` orders listings and their cursors (newest first)."""
    conn.execute(
        """CREATE TABLE fine_tuning_jobs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    tenant_id INTEGER NOT NULL REFERENCES tenants (id),
    status TEXT NOT NULL,
    body TEXT NOT NULL
)"""
    )
    for table in ("fine_tuning_events", "fine_tuning_checkpoints"):
        conn.execute(
            f"""CREATE TABLE {table} (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL REFERENCES fine_tuning_jobs (id),
    body TEXT NOT NULL
)"""
        )
        conn.execute(f"CREATE INDEX {table}_by_job ON {table} (job_id, seq)")
    # The signing secret is kept as given out: an HMAC needs it (unlike API keys, it cannot be
    # stored hashed); the registry file is readable by the server's user only. After a
    # rotation the previous secret may sign too, until it expires (Unix seconds).
    conn.execute(
        """CREATE TABLE webhook_endpoints (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    tenant_id INTEGER NOT NULL REFERENCES tenants (id),
    signing_secret TEXT NOT NULL,
    previous_secret TEXT,
    previous_secret_expires_at INTEGER,
    body TEXT NOT NULL
)"""
    )
    conn.execute(
        """CREATE TABLE webhook_deliveries (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    endpoint_id TEXT NOT NULL REFERENCES webhook_endpoints (id),
    event_type TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts INTEGER NOT NULL,
    last_status_code INTEGER,
    last_error TEXT,
    created_at TEXT NOT NULL,
    finished_at TEXT
)"""
    )
    conn.execute(
        """CREATE TABLE fine_tuning_settings (
    tenant_id INTEGER PRIMARY KEY REFERENCES tenants (id),
    promote_new_versions INTEGER NOT NULL CHECK (promote_new_versions IN (0, 1))
)"""
    )


def m005_key_expiry(conn: sqlite3.Connection) -> None:
    """When a key stops working on its own (a rotated key's overlap window ends); NULL: never.
    Unlike revoked_at, it may lie in the future."""
    conn.execute("ALTER TABLE api_keys ADD COLUMN expires_at TEXT")


def m006_sealed_artifacts(conn: sqlite3.Connection) -> None:
    """Artifacts are sealed under their tenant's key, in a dir of the tenant's own. A version
    stored before that (`artifacts/<sha256>`, in clear, shareable between tenants) is moved
    once to its sealed copy, `artifacts/<tenant>/<same sha256>`: the same content, so a version
    id still always means the same weights. Every other column stays immutable."""
    conn.execute("DROP TRIGGER versions_are_immutable")
    conn.execute(
        """CREATE TRIGGER versions_are_immutable BEFORE UPDATE OF id, adapter_id, number, sha256,
    size_bytes, rank, target_modules, created_at, created_by, training_record ON versions
BEGIN
    SELECT RAISE(ABORT, 'versions are immutable');
END"""
    )
    conn.execute(
        """CREATE TRIGGER versions_move_to_sealed_once BEFORE UPDATE OF artifact_path ON versions
WHEN NOT (OLD.artifact_path = 'artifacts/' || OLD.sha256
          AND NEW.artifact_path GLOB 'artifacts/?*/' || OLD.sha256)
BEGIN
    SELECT RAISE(ABORT, 'versions are immutable');
END"""
    )


MIGRATIONS = [m001_initial, m002_base_model_access, m003_quotas_and_ledger, m004_fine_tuning_api,
              m005_key_expiry, m006_sealed_artifacts]

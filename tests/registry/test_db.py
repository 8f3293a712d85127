import sqlite3

import pytest

from loraplex.registry import db
from loraplex.registry.db import DB_FILE, connect, migrate, transaction

# The schema every home ends up with. A new migration changes this on purpose; anything else
# that changes it is a bug.
EXPECTED_SCHEMA = [
    (
        "table",
        "_migrations",
        "CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)",
    ),
    (
        "table",
        "adapters",
        """CREATE TABLE adapters (
    id INTEGER PRIMARY KEY,
    tenant_id INTEGER NOT NULL REFERENCES tenants (id),
    name TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (tenant_id, name)
)""",
    ),
    (
        "table",
        "api_keys",
        """CREATE TABLE api_keys (
    key_id TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('tenant', 'admin')),
    tenant_id INTEGER REFERENCES tenants (id),
    secret_sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL,
    revoked_at TEXT,
    CHECK ((role = 'admin') = (tenant_id IS NULL))
)""",
    ),
    ("index", "api_keys_tenant", "CREATE INDEX api_keys_tenant ON api_keys (tenant_id)"),
    (
        "table",
        "audit",
        """CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    tenant_id INTEGER REFERENCES tenants (id),
    details TEXT NOT NULL
)""",
    ),
    (
        "trigger",
        "audit_no_delete",
        """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END""",
    ),
    (
        "trigger",
        "audit_no_update",
        """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END""",
    ),
    ("index", "audit_tenant", "CREATE INDEX audit_tenant ON audit (tenant_id, id)"),
    (
        "table",
        "base_model_access",
        """CREATE TABLE base_model_access (
    tenant_id INTEGER PRIMARY KEY REFERENCES tenants (id)
)""",
    ),
    (
        "table",
        "deployment_history",
        """CREATE TABLE deployment_history (
    adapter_id INTEGER NOT NULL REFERENCES adapters (id),
    seq INTEGER NOT NULL,
    split TEXT NOT NULL,
    created_at TEXT NOT NULL,
    actor TEXT NOT NULL,
    PRIMARY KEY (adapter_id, seq)
)""",
    ),
    (
        "table",
        "generation",
        """CREATE TABLE generation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
)""",
    ),
    (
        "table",
        "quotas",
        """CREATE TABLE quotas (
    tenant_id INTEGER PRIMARY KEY REFERENCES tenants (id),
    tier REAL NOT NULL CHECK (tier > 0),
    requests_per_minute INTEGER CHECK (requests_per_minute > 0),
    tokens_per_minute INTEGER CHECK (tokens_per_minute > 0),
    max_concurrent INTEGER CHECK (max_concurrent > 0),
    monthly_tokens INTEGER CHECK (monthly_tokens > 0)
)""",
    ),
    ("index", "sqlite_autoindex__migrations_1", None),
    ("index", "sqlite_autoindex_adapters_1", None),
    ("index", "sqlite_autoindex_api_keys_1", None),
    ("index", "sqlite_autoindex_deployment_history_1", None),
    ("index", "sqlite_autoindex_tenants_1", None),
    ("index", "sqlite_autoindex_usage_1", None),
    ("index", "sqlite_autoindex_versions_1", None),
    ("table", "sqlite_sequence", "CREATE TABLE sqlite_sequence(name,seq)"),
    (
        "table",
        "tenants",
        """CREATE TABLE tenants (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
)""",
    ),
    (
        "table",
        "usage",
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
)""",
    ),
    (
        "table",
        "version_stats",
        """CREATE TABLE version_stats (
    version_id INTEGER PRIMARY KEY REFERENCES versions (id),
    requests INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_ms_sum REAL NOT NULL,
    ttft_ms_sum REAL NOT NULL
)""",
    ),
    (
        "table",
        "versions",
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
    ),
    (
        "trigger",
        "versions_are_immutable",
        """CREATE TRIGGER versions_are_immutable BEFORE UPDATE ON versions
BEGIN
    SELECT RAISE(ABORT, 'versions are immutable');
END""",
    ),
]

# What m004_fine_tuning_api adds.
M004_SCHEMA = [
    (
        "table",
        "fine_tuning_checkpoints",
        """CREATE TABLE fine_tuning_checkpoints (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL REFERENCES fine_tuning_jobs (id),
    body TEXT NOT NULL
)""",
    ),
    (
        "index",
        "fine_tuning_checkpoints_by_job",
        """CREATE INDEX fine_tuning_checkpoints_by_job ON fine_tuning_checkpoints (job_id, seq)""",
    ),
    (
        "table",
        "fine_tuning_events",
        """CREATE TABLE fine_tuning_events (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL REFERENCES fine_tuning_jobs (id),
    body TEXT NOT NULL
)""",
    ),
    (
        "index",
        "fine_tuning_events_by_job",
        """CREATE INDEX fine_tuning_events_by_job ON fine_tuning_events (job_id, seq)""",
    ),
    (
        "table",
        "fine_tuning_jobs",
        """CREATE TABLE fine_tuning_jobs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    tenant_id INTEGER NOT NULL REFERENCES tenants (id),
    status TEXT NOT NULL,
    body TEXT NOT NULL
)""",
    ),
    (
        "table",
        "fine_tuning_settings",
        """CREATE TABLE fine_tuning_settings (
    tenant_id INTEGER PRIMARY KEY REFERENCES tenants (id),
    promote_new_versions INTEGER NOT NULL CHECK (promote_new_versions IN (0, 1))
)""",
    ),
    ("index", "sqlite_autoindex_fine_tuning_checkpoints_1", None),
    ("index", "sqlite_autoindex_fine_tuning_events_1", None),
    ("index", "sqlite_autoindex_fine_tuning_jobs_1", None),
    ("index", "sqlite_autoindex_webhook_endpoints_1", None),
    (
        "table",
        "webhook_deliveries",
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
)""",
    ),
    (
        "table",
        "webhook_endpoints",
        """CREATE TABLE webhook_endpoints (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    tenant_id INTEGER NOT NULL REFERENCES tenants (id),
    signing_secret TEXT NOT NULL,
    previous_secret TEXT,
    previous_secret_expires_at INTEGER,
    body TEXT NOT NULL
)""",
    ),
]


# m005 adds api_keys.expires_at (SQLite splices the column into the stored CREATE TABLE);
# m006 lets a version move, once, from its clear artifact to its sealed copy. Rows here replace
# the rows of the same name above.
M005_M006_SCHEMA = [
    (
        "table",
        "api_keys",
        """CREATE TABLE api_keys (
    key_id TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('tenant', 'admin')),
    tenant_id INTEGER REFERENCES tenants (id),
    secret_sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL,
    revoked_at TEXT, expires_at TEXT,
    CHECK ((role = 'admin') = (tenant_id IS NULL))
)""",
    ),
    (
        "trigger",
        "versions_are_immutable",
        """CREATE TRIGGER versions_are_immutable BEFORE UPDATE OF id, adapter_id, number, sha256,
    size_bytes, rank, target_modules, created_at, created_by, training_record ON versions
BEGIN
    SELECT RAISE(ABORT, 'versions are immutable');
END""",
    ),
    (
        "trigger",
        "versions_move_to_sealed_once",
        """CREATE TRIGGER versions_move_to_sealed_once BEFORE UPDATE OF artifact_path ON versions
WHEN NOT (OLD.artifact_path = 'artifacts/' || OLD.sha256
          AND NEW.artifact_path GLOB 'artifacts/?*/' || OLD.sha256)
BEGIN
    SELECT RAISE(ABORT, 'versions are immutable');
END""",
    ),
]


def schema(conn: sqlite3.Connection) -> list[tuple]:
    rows = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name")
    return [tuple(row) for row in rows]


def applied(conn: sqlite3.Connection) -> list[tuple]:
    return [tuple(row) for row in conn.execute("SELECT name, applied_at FROM _migrations")]


def test_schema_is_exactly_the_expected_one(tmp_path):
    conn = connect(tmp_path)
    assert (tmp_path / DB_FILE).is_file()
    replaced = {row[1] for row in M005_M006_SCHEMA}
    expected = [row for row in EXPECTED_SCHEMA + M004_SCHEMA if row[1] not in replaced]
    assert schema(conn) == sorted(expected + M005_M006_SCHEMA, key=lambda row: row[1])
    assert [name for name, _ in applied(conn)] == [m.__name__ for m in db.MIGRATIONS]


def test_migrating_twice_is_a_no_op(tmp_path):
    conn = connect(tmp_path)
    before = (schema(conn), applied(conn))
    migrate(conn)
    assert (schema(conn), applied(conn)) == before
    # A second process opening the same home migrates nothing either.
    assert (schema(connect(tmp_path)), applied(connect(tmp_path))) == before


def test_a_new_migration_is_applied_once(tmp_path, monkeypatch):
    conn = connect(tmp_path)
    calls = []

    def m999_example(conn):
        calls.append(conn)
        conn.execute("CREATE TABLE example (id INTEGER PRIMARY KEY)")

    monkeypatch.setattr(db, "MIGRATIONS", [*db.MIGRATIONS, m999_example])
    migrate(conn)
    migrate(conn)
    assert len(calls) == 1
    assert [name for name, _ in applied(conn)][-1] == "m999_example"
    assert [name for name, _ in applied(conn)] == [m.__name__ for m in db.MIGRATIONS]


def test_connection_settings(tmp_path):
    conn = connect(tmp_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000


def test_transaction_rolls_back_on_error(tmp_path):
    conn = connect(tmp_path)
    with pytest.raises(RuntimeError), transaction(conn):
        conn.execute("INSERT INTO tenants (name, created_at) VALUES ('acme', 'now')")
        raise RuntimeError
    assert conn.execute("SELECT COUNT(*) FROM tenants").fetchone()[0] == 0
    assert not conn.in_transaction

"""The fine-tuning API's records: jobs, their events and checkpoints, webhook endpoints and
their deliveries, and each tenant's choice of whether a fine-tuned version serves at once.

Each job, event, checkpoint and endpoint is stored as the JSON object the API shows, next to
the columns it is found by (tables of migration m004). Every lookup names its tenant: a
tenant's key can never reach another tenant's rows, and a missing row and another tenant's
row look the same (None). Listings are newest first with OpenAI's cursor: `after` is the id of
the last item of the previous page.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loraplex.registry import audit
from loraplex.registry.db import connect, now, transaction
from loraplex.registry.errors import InvalidInput

MAX_PAGE = 100  # OpenAI's largest `limit`


class FineTuningStore:
    """Thread-safe: one connection behind a lock (like the Registry facade)."""

    def __init__(self, home: Path):
        self._conn = connect(Path(home))
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- jobs ------------------------------------------------------------------------------
    def add_job(self, tenant_id: int, job: dict, *, actor: str) -> None:
        with self._change() as conn:
            conn.execute("INSERT INTO fine_tuning_jobs (id, tenant_id, status, body)"
                         " VALUES (?, ?, ?, ?)",
                         (job["id"], tenant_id, job["status"], json.dumps(job)))
            audit.record(conn, actor, "fine_tuning.create", job["id"],
                         {"model": job["model"], "training_file": job["training_file"]},
                         tenant_id=tenant_id)

    def save_job(self, job: dict) -> None:
        with self._change() as conn:
            conn.execute("UPDATE fine_tuning_jobs SET status = ?, body = ? WHERE id = ?",
                         (job["status"], json.dumps(job), job["id"]))

    def get_job(self, tenant_id: int, job_id: str) -> dict | None:
        with self._read() as conn:
            row = conn.execute("SELECT body FROM fine_tuning_jobs WHERE id = ? AND tenant_id = ?",
                               (job_id, tenant_id)).fetchone()
        return None if row is None else json.loads(row["body"])

    def list_jobs(self, tenant_id: int, after: str | None, limit: int) -> tuple[list[dict], bool]:
        return self._page("fine_tuning_jobs", "tenant_id = ?", (tenant_id,), after, limit)

    def jobs_with_status(self, statuses: tuple[str, ...]) -> list[tuple[int, dict]]:
        """(tenant id, job) of every job in one of `statuses`, oldest first (for a restart)."""
        marks = ", ".join("?" * len(statuses))
        with self._read() as conn:
            rows = conn.execute(f"SELECT tenant_id, body FROM fine_tuning_jobs WHERE status IN"
                                f" ({marks}) ORDER BY seq", statuses).fetchall()
        return [(row["tenant_id"], json.loads(row["body"])) for row in rows]

    # -- events and checkpoints --------------------------------------------------------------
    def add_event(self, job_id: str, event: dict) -> None:
        self._add_child("fine_tuning_events", job_id, event)

    def list_events(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        return self._page("fine_tuning_events", "job_id = ?", (job_id,), after, limit)

    def add_checkpoint(self, job_id: str, checkpoint: dict) -> None:
        self._add_child("fine_tuning_checkpoints", job_id, checkpoint)

    def list_checkpoints(self, job_id: str, after: str | None, limit: int
                         ) -> tuple[list[dict], bool]:
        return self._page("fine_tuning_checkpoints", "job_id = ?", (job_id,), after, limit)

    def set_last_checkpoint_model(self, job_id: str, model: str) -> None:
        """Name the job's model on its last checkpoint, the one whose weights were kept."""
        with self._change() as conn:
            row = conn.execute("SELECT seq, body FROM fine_tuning_checkpoints WHERE job_id = ?"
                               " ORDER BY seq DESC LIMIT 1", (job_id,)).fetchone()
            if row is not None:
                body = {**json.loads(row["body"]), "fine_tuned_model_checkpoint": model}
                conn.execute("UPDATE fine_tuning_checkpoints SET body = ? WHERE seq = ?",
                             (json.dumps(body), row["seq"]))

    # -- webhook endpoints -------------------------------------------------------------------
    def add_endpoint(self, tenant_id: int, endpoint: dict, secret: str, *, actor: str) -> None:
        with self._change() as conn:
            conn.execute("INSERT INTO webhook_endpoints (id, tenant_id, signing_secret, body)"
                         " VALUES (?, ?, ?, ?)",
                         (endpoint["id"], tenant_id, secret, json.dumps(endpoint)))
            audit.record(conn, actor, "webhook.create", endpoint["id"],
                         {"url": endpoint["url"], "event_types": endpoint["event_types"]},
                         tenant_id=tenant_id)

    def save_endpoint(self, tenant_id: int, endpoint: dict, *, actor: str,
                      secret: str | None = None, previous_expires_at: int | None = None
                      ) -> None:
        """Store a changed endpoint; with `secret`, its rotated signing secret (the previous
        one signing too until `previous_expires_at`, when given)."""
        with self._change() as conn:
            conn.execute("UPDATE webhook_endpoints SET body = ? WHERE id = ? AND tenant_id = ?",
                         (json.dumps(endpoint), endpoint["id"], tenant_id))
            if secret is not None:
                conn.execute(
                    "UPDATE webhook_endpoints SET previous_secret = CASE WHEN ? IS NULL THEN"
                    " NULL ELSE signing_secret END, previous_secret_expires_at = ?,"
                    " signing_secret = ? WHERE id = ? AND tenant_id = ?",
                    (previous_expires_at, previous_expires_at, secret, endpoint["id"],
                     tenant_id))
            action = "webhook.rotate_secret" if secret else "webhook.update"
            audit.record(conn, actor, action, endpoint["id"], {"url": endpoint["url"]},
                         tenant_id=tenant_id)

    def get_endpoint(self, tenant_id: int, endpoint_id: str) -> dict | None:
        with self._read() as conn:
            row = conn.execute("SELECT body FROM webhook_endpoints WHERE id = ? AND"
                               " tenant_id = ?", (endpoint_id, tenant_id)).fetchone()
        return None if row is None else json.loads(row["body"])

    def list_endpoints(self, tenant_id: int, after: str | None, limit: int
                       ) -> tuple[list[dict], bool]:
        return self._page("webhook_endpoints", "tenant_id = ?", (tenant_id,), after, limit)

    def delete_endpoint(self, tenant_id: int, endpoint_id: str, *, actor: str) -> bool:
        with self._change() as conn:
            conn.execute("DELETE FROM webhook_deliveries WHERE endpoint_id IN (SELECT id FROM"
                         " webhook_endpoints WHERE id = ? AND tenant_id = ?)",
                         (endpoint_id, tenant_id))
            deleted = conn.execute("DELETE FROM webhook_endpoints WHERE id = ? AND"
                                   " tenant_id = ?", (endpoint_id, tenant_id)).rowcount
            if deleted:
                audit.record(conn, actor, "webhook.delete", endpoint_id, {},
                             tenant_id=tenant_id)
        return bool(deleted)

    def endpoints_for(self, tenant_id: int, event_type: str) -> list[dict]:
        """The tenant's endpoints subscribed to `event_type`."""
        with self._read() as conn:
            rows = conn.execute("SELECT body FROM webhook_endpoints WHERE tenant_id = ?"
                                " ORDER BY seq", (tenant_id,)).fetchall()
        endpoints = [json.loads(row["body"]) for row in rows]
        return [e for e in endpoints if event_type in e["event_types"]]

    # -- webhook deliveries ------------------------------------------------------------------
    def delivery_target(self, endpoint_id: str, at: int) -> tuple[str, list[str]] | None:
        """(url, the secrets that sign at Unix time `at`) of an endpoint; None once deleted."""
        with self._read() as conn:
            row = conn.execute("SELECT * FROM webhook_endpoints WHERE id = ?",
                               (endpoint_id,)).fetchone()
        if row is None:
            return None
        secrets = [row["signing_secret"]]
        if row["previous_secret"] and at < row["previous_secret_expires_at"]:
            secrets.append(row["previous_secret"])
        return json.loads(row["body"])["url"], secrets

    def add_delivery(self, event_id: str, endpoint_id: str, event_type: str, payload: str
                     ) -> int:
        with self._change() as conn:
            cursor = conn.execute(
                "INSERT INTO webhook_deliveries (event_id, endpoint_id, event_type, payload,"
                " status, attempts, created_at) VALUES (?, ?, ?, ?, 'pending', 0, ?)",
                (event_id, endpoint_id, event_type, payload, now()))
            return cursor.lastrowid

    def record_attempt(self, delivery: int, *, status: str, status_code: int | None,
                       error: str | None) -> None:
        """One attempt at a delivery; status 'pending' (will retry), 'delivered' or 'failed'."""
        finished = None if status == "pending" else now()
        with self._change() as conn:
            conn.execute("UPDATE webhook_deliveries SET status = ?, attempts = attempts + 1,"
                         " last_status_code = ?, last_error = ?, finished_at = ? WHERE seq = ?",
                         (status, status_code, error, finished, delivery))

    def deliveries(self, endpoint_id: str) -> list[dict]:
        """Every delivery to the endpoint, oldest first (for the operator and the tests)."""
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM webhook_deliveries WHERE endpoint_id = ?"
                                " ORDER BY seq", (endpoint_id,)).fetchall()
        return [dict(row) for row in rows]

    def pending_deliveries(self) -> list[dict]:
        """Deliveries a restart cut short, to be tried again."""
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM webhook_deliveries WHERE status = 'pending'"
                                " ORDER BY seq").fetchall()
        return [dict(row) for row in rows]

    # -- the tenant's setting ----------------------------------------------------------------
    def promotes_new_versions(self, tenant_id: int) -> bool:
        with self._read() as conn:
            row = conn.execute("SELECT promote_new_versions FROM fine_tuning_settings"
                               " WHERE tenant_id = ?", (tenant_id,)).fetchone()
        return bool(row and row["promote_new_versions"])

    def set_promotes_new_versions(self, tenant_id: int, promote: bool, *, actor: str) -> None:
        with self._change() as conn:
            conn.execute("INSERT INTO fine_tuning_settings VALUES (?, ?) ON CONFLICT (tenant_id)"
                         " DO UPDATE SET promote_new_versions = excluded.promote_new_versions",
                         (tenant_id, int(promote)))
            audit.record(conn, actor, "fine_tuning.settings", str(tenant_id),
                         {"promote_new_versions": promote}, tenant_id=tenant_id)

    # -- helpers ---------------------------------------------------------------------------
    def _add_child(self, table: str, job_id: str, body: dict) -> None:
        with self._change() as conn:
            conn.execute(f"INSERT INTO {table} (id, job_id, body) VALUES (?, ?, ?)",
                         (body["id"], job_id, json.dumps(body)))

    def _page(self, table: str, where: str, params: tuple, after: str | None, limit: int
              ) -> tuple[list[dict], bool]:
        """(up to `limit` rows newest first, whether there are more)."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        with self._read() as conn:
            cursor_clause = ""
            if after is not None:
                # The cursor is looked up within the same listing: another list's id is unknown.
                row = conn.execute(f"SELECT seq FROM {table} WHERE id = ? AND {where}",
                                   (after, *params)).fetchone()
                if row is None:
                    raise InvalidInput(f"after: no item {after!r} in this list")
                cursor_clause, params = " AND seq < ?", (*params, row["seq"])
            rows = conn.execute(f"SELECT body FROM {table} WHERE {where}{cursor_clause}"
                                " ORDER BY seq DESC LIMIT ?", (*params, limit + 1)).fetchall()
        items = [json.loads(row["body"]) for row in rows]
        return items[:limit], len(items) > limit

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self._conn, write=False):
            yield self._conn

    @contextmanager
    def _change(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self._conn):
            yield self._conn

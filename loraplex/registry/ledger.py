"""The usage ledger: what each tenant used, per key, adapter, version and UTC hour.

Billing reads it, so it must agree with what the API answered: the server adds each finished
request's `usage` (the same numbers as the response's `usage` field) to an in-memory batch, and
LedgerWriter commits the batch every FLUSH_SECONDS in one transaction (an UPSERT per row, not a
write per request). A committed transaction survives a crash of the server process (SQLite's WAL),
so a SIGKILL loses at most the requests that finished in the last FLUSH_SECONDS.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from loraplex.registry.errors import InvalidInput

FLUSH_SECONDS = 1.0
COUNTERS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_prompt_tokens")
# How `usage` groups rows: the columns each grouping keeps, besides the counters.
GROUPINGS = {
    "key": ("key_id",),
    "adapter": ("adapter",),
    "version": ("adapter", "version"),
    "day": ("day",),
    "hour": ("hour",),
}
_HOUR_FORMAT = "%Y-%m-%dT%H:00"
_INPUT_FORMATS = ("%Y-%m-%d", "%Y-%m-%dT%H", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UsageKey:
    tenant_id: int
    key_id: str
    adapter: str  # the adapter's name, or the base model's
    version: str  # "v2", or "base"
    hour: str  # UTC, "2026-12-02T18:00"


def hour_of(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(_HOUR_FORMAT)


def parse_time(text: str, name: str) -> str:
    """A user's date or time (UTC: 2026-12-01, 2026-12-01T18, 2026-12-01T18:30, 2026-12) as the
    hour bucket it falls in; InvalidInput naming `name` otherwise."""
    cleaned = text.strip().removesuffix("Z")
    for fmt in _INPUT_FORMATS:
        try:
            return datetime.strptime(cleaned, fmt).strftime(_HOUR_FORMAT)
        except ValueError:
            continue
    raise InvalidInput(f"{name} {text!r} is not a date or time like 2026-12-01 or "
                       "2026-12-01T18:00 (UTC)")


def month_bounds(moment: datetime) -> tuple[str, str]:
    """The hour buckets [start, end) of the calendar month (UTC) holding `moment`."""
    moment = moment.astimezone(UTC)
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(
        month=start.month + 1)
    return start.strftime(_HOUR_FORMAT), end.strftime(_HOUR_FORMAT)


def add(conn: sqlite3.Connection, batch: Mapping[UsageKey, tuple[int, ...]]) -> None:
    """Add each key's counters (in COUNTERS' order) to its row."""
    conn.executemany(
        "INSERT INTO usage (tenant_id, key_id, adapter, version, hour, "
        f"{', '.join(COUNTERS)}) VALUES (?, ?, ?, ?, ?, {', '.join('?' for _ in COUNTERS)})"
        " ON CONFLICT (tenant_id, hour, key_id, adapter, version) DO UPDATE SET "
        + ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTERS),
        [(k.tenant_id, k.key_id, k.adapter, k.version, k.hour, *counts)
         for k, counts in batch.items()],
    )


def query(conn: sqlite3.Connection, tenant_id: int, start: str | None, end: str | None,
          group_by: str) -> list[dict]:
    """Rows of counters (and total_tokens) for hours in [start, end), grouped by `group_by`."""
    if group_by not in GROUPINGS:
        raise InvalidInput(f"group_by must be one of {', '.join(GROUPINGS)}, got {group_by!r}")
    columns = GROUPINGS[group_by]
    select = ", ".join("substr(hour, 1, 10) AS day" if c == "day" else c for c in columns)
    sums = ", ".join(f"SUM({c}) AS {c}" for c in COUNTERS)
    rows = conn.execute(
        f"SELECT {select}, {sums} FROM usage WHERE tenant_id = ?"
        " AND hour >= COALESCE(?, '') AND hour < COALESCE(?, '9999')"
        f" GROUP BY {', '.join(columns)} ORDER BY {', '.join(columns)}",
        (tenant_id, start, end),
    )
    return [dict(row) | {"total_tokens": row["prompt_tokens"] + row["completion_tokens"]}
            for row in rows]


def tokens_between(conn: sqlite3.Connection, tenant_id: int, start: str, end: str) -> int:
    """Prompt + completion tokens of the tenant in hours [start, end)."""
    row = conn.execute(
        "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM usage"
        " WHERE tenant_id = ? AND hour >= ? AND hour < ?", (tenant_id, start, end)).fetchone()
    return row[0]


def recently_used(conn: sqlite3.Connection, limit: int) -> list[tuple[str, str]]:
    """(tenant name, adapter name) of the adapters that served most recently, newest first, by
    the last hour each was billed in (the base model excluded)."""
    rows = conn.execute(
        "SELECT tenants.name AS tenant, usage.adapter AS adapter, MAX(usage.hour) AS last"
        " FROM usage JOIN tenants ON tenants.id = usage.tenant_id WHERE usage.version != 'base'"
        " GROUP BY usage.tenant_id, usage.adapter ORDER BY last DESC, tenant, adapter LIMIT ?",
        (limit,))
    return [(row["tenant"], row["adapter"]) for row in rows]


class LedgerWriter:
    """Batches usage in memory and commits it every `interval` seconds on its own thread.

    `commit(batch)` writes one batch in one transaction. If it fails (a full disk), the batch
    stays pending and is retried at the next flush: nothing is dropped while the process lives.
    """

    def __init__(self, commit: Callable[[dict[UsageKey, tuple[int, ...]]], None],
                 interval: float = FLUSH_SECONDS):
        self._commit = commit
        self._interval = interval
        self._pending: dict[UsageKey, list[int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.last_error: str | None = None  # the last failed flush, until one succeeds
        self._thread = threading.Thread(target=self._run, name="loraplex-ledger", daemon=True)
        self._thread.start()

    def record(self, key: UsageKey, *, errors: int, prompt_tokens: int, completion_tokens: int,
               cached_prompt_tokens: int = 0) -> None:
        """One finished request."""
        counts = (1, errors, prompt_tokens, completion_tokens, cached_prompt_tokens)
        with self._lock:
            row = self._pending.setdefault(key, [0] * len(COUNTERS))
            for i, value in enumerate(counts):
                row[i] += value

    def pending_tokens(self, tenant_id: int, start: str, end: str) -> int:
        """Prompt + completion tokens recorded but not committed yet, in hours [start, end)."""
        with self._lock:
            return sum(row[2] + row[3] for key, row in self._pending.items()
                       if key.tenant_id == tenant_id and start <= key.hour < end)

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return
        try:
            self._commit({key: tuple(row) for key, row in batch.items()})
        except Exception as e:  # kept for the next try; serving goes on
            log.error("usage ledger: flush failed, will retry: %s", e)
            self.last_error = f"{type(e).__name__}: {e}"
            with self._lock:
                for key, row in batch.items():
                    merged = self._pending.setdefault(key, [0] * len(COUNTERS))
                    for i, value in enumerate(row):
                        merged[i] += value
            return
        self.last_error = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

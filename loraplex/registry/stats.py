"""Per-version request counters (a tenant's billable usage is the ledger, ledger.py).

Sums are stored, not means, so each request is one UPSERT that adds to the row; means are
computed when read.
"""

from __future__ import annotations

import sqlite3

from loraplex.registry.adapters import label

_COUNTERS = ("requests", "errors", "prompt_tokens", "completion_tokens")


def record_request(
    conn: sqlite3.Connection,
    version_id: int,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    latency_ms: float,
    ttft_ms: float,
    error: bool,
) -> None:
    conn.execute(
        "INSERT INTO version_stats (version_id, requests, errors, prompt_tokens,"
        " completion_tokens, latency_ms_sum, ttft_ms_sum) VALUES (?, 1, ?, ?, ?, ?, ?)"
        " ON CONFLICT (version_id) DO UPDATE SET"
        " requests = requests + 1,"
        " errors = errors + excluded.errors,"
        " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
        " completion_tokens = completion_tokens + excluded.completion_tokens,"
        " latency_ms_sum = latency_ms_sum + excluded.latency_ms_sum,"
        " ttft_ms_sum = ttft_ms_sum + excluded.ttft_ms_sum",
        (version_id, int(error), prompt_tokens, completion_tokens, latency_ms, ttft_ms),
    )


def version_stats(conn: sqlite3.Connection, adapter_id: int) -> list[dict]:
    """One dict per version of the adapter (zeros for versions never requested), in order.

    Keys: version_id, version ("v1"), requests, errors, prompt_tokens, completion_tokens,
    mean_latency_ms, mean_ttft_ms (None before the first request).
    """
    rows = conn.execute(
        "SELECT v.id AS version_id, v.number, COALESCE(s.requests, 0) AS requests,"
        " COALESCE(s.errors, 0) AS errors, COALESCE(s.prompt_tokens, 0) AS prompt_tokens,"
        " COALESCE(s.completion_tokens, 0) AS completion_tokens,"
        " s.latency_ms_sum, s.ttft_ms_sum"
        " FROM versions v LEFT JOIN version_stats s ON s.version_id = v.id"
        " WHERE v.adapter_id = ? ORDER BY v.number",
        (adapter_id,),
    )
    return [
        {
            "version_id": row["version_id"],
            "version": label(row["number"]),
            **{name: row[name] for name in _COUNTERS},
            "mean_latency_ms": _mean(row["latency_ms_sum"], row["requests"]),
            "mean_ttft_ms": _mean(row["ttft_ms_sum"], row["requests"]),
        }
        for row in rows
    ]


def _mean(total: float | None, count: int) -> float | None:
    return None if count == 0 else total / count

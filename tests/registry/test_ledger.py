"""The usage ledger: batched UPSERTs, grouping, periods, and a writer that never drops usage."""

import sqlite3
from datetime import UTC, datetime

import pytest

from loraplex.registry import InvalidInput
from loraplex.registry.ledger import (
    LedgerWriter,
    UsageKey,
    hour_of,
    month_bounds,
    parse_time,
)


def key(tenant_id, key_id="k1", adapter="bot", version="v1", hour="2026-12-02T18:00"):
    return UsageKey(tenant_id, key_id, adapter, version, hour)


def test_batches_add_up_per_row(registry, acme):
    registry.add_usage({key(acme.id): (1, 0, 10, 5, 0)})
    registry.add_usage({key(acme.id): (2, 1, 20, 6, 3), key(acme.id, "k2"): (1, 0, 1, 1, 0)})
    [row] = registry.usage("acme", group_by="key")[:1]
    assert row == {"key_id": "k1", "requests": 3, "errors": 1, "prompt_tokens": 30,
                   "completion_tokens": 11, "cached_prompt_tokens": 3, "total_tokens": 41}


def test_grouping_and_the_half_open_period(registry, acme):
    registry.create_tenant("beta", actor="op")
    beta = registry.get_tenant("beta")
    registry.add_usage({
        key(acme.id, hour="2026-12-01T23:00"): (1, 0, 10, 10, 0),
        key(acme.id, version="v2", hour="2026-12-02T00:00"): (1, 0, 5, 5, 0),
        key(acme.id, adapter="faq", hour="2026-12-02T09:00"): (1, 0, 1, 1, 0),
        key(beta.id, hour="2026-12-02T09:00"): (100, 0, 100, 100, 0),  # never acme's
    })
    by_day = registry.usage("acme", group_by="day")
    assert [(r["day"], r["requests"], r["total_tokens"]) for r in by_day] == [
        ("2026-12-01", 1, 20), ("2026-12-02", 2, 12)]
    by_version = registry.usage("acme", group_by="version")
    assert [(r["adapter"], r["version"], r["requests"]) for r in by_version] == [
        ("bot", "v1", 1), ("bot", "v2", 1), ("faq", "v1", 1)]
    assert [r["adapter"] for r in registry.usage("acme", group_by="adapter")] == ["bot", "faq"]
    # [from, to): the hour at `to` is not counted
    day = registry.usage("acme", start="2026-12-02", end="2026-12-02T09", group_by="hour")
    assert [r["hour"] for r in day] == ["2026-12-02T00:00"]
    assert registry.usage("acme", start="2027-01-01") == []


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "", "2026-12-01 18:00:00+02"])
def test_bad_times_are_refused_by_name(text):
    with pytest.raises(InvalidInput, match="from"):
        parse_time(text, "from")


def test_bad_grouping(registry, acme):
    with pytest.raises(InvalidInput, match="group_by must be one of"):
        registry.usage("acme", group_by="colour")


def test_times_fall_in_their_hour_bucket():
    assert parse_time("2026-12-01", "from") == "2026-12-01T00:00"
    assert parse_time("2026-12-01T18:59:59Z", "from") == "2026-12-01T18:00"
    assert parse_time("2026-12", "to") == "2026-12-01T00:00"
    assert hour_of(datetime(2026, 12, 2, 18, 59, tzinfo=UTC)) == "2026-12-02T18:00"
    assert month_bounds(datetime(2026, 12, 31, 23, tzinfo=UTC)) == ("2026-12-01T00:00",
                                                                    "2027-01-01T00:00")
    assert month_bounds(datetime(2026, 2, 10, tzinfo=UTC)) == ("2026-02-01T00:00",
                                                               "2026-03-01T00:00")


def test_the_writer_batches_and_keeps_a_failed_batch_for_the_next_flush(registry, acme):
    attempts = []

    def commit(batch):
        attempts.append(batch)
        if len(attempts) == 1:
            raise sqlite3.OperationalError("database or disk is full")
        registry.add_usage(batch)

    writer = LedgerWriter(commit, interval=3600)
    for _ in range(3):
        writer.record(key(acme.id), errors=0, prompt_tokens=10, completion_tokens=2)
    writer.flush()  # fails: nothing lost
    assert "disk is full" in writer.last_error
    assert writer.pending_tokens(acme.id, "2026-12-01T00:00", "2027-01-01T00:00") == 36
    writer.record(key(acme.id), errors=1, prompt_tokens=1, completion_tokens=0)
    writer.close()  # flushes what is pending, in one batch
    assert len(attempts) == 2 and len(attempts[1]) == 1
    assert writer.last_error is None
    [row] = registry.usage("acme", group_by="key")
    assert (row["requests"], row["errors"], row["prompt_tokens"], row["completion_tokens"]) == (
        4, 1, 31, 6)


def test_the_writer_commits_on_its_own_every_interval(registry, acme):
    writer = LedgerWriter(registry.add_usage, interval=0.05)
    writer.record(key(acme.id), errors=0, prompt_tokens=1, completion_tokens=1)
    deadline = datetime.now().timestamp() + 5
    while not registry.usage("acme") and datetime.now().timestamp() < deadline:
        pass
    assert registry.usage("acme")[0]["requests"] == 1
    writer.close()

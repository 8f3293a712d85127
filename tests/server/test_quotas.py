"""QuotaGate: per-minute windows, the monthly budget, concurrency, and the x-ratelimit headers."""

from datetime import UTC, datetime

import pytest

from loraplex.registry import Registry
from loraplex.registry.ledger import LedgerWriter, UsageKey, hour_of
from loraplex.server.quotas import QuotaExceeded, QuotaGate, _duration

START = datetime(2026, 12, 2, 18, 0, 0, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def setup(tmp_path):
    registry = Registry(tmp_path)
    tenant = registry.create_tenant("acme", actor="test")
    ledger = LedgerWriter(registry.add_usage, interval=3600)  # flushed by hand
    clock = Clock(START + 10)
    gate = QuotaGate(registry, ledger, default_max_concurrent=3, clock=clock)
    yield registry, ledger, gate, clock, tenant.id
    ledger.close()
    registry.close()


def test_requests_per_minute_exactly_at_the_limit_then_reset_at_the_boundary(setup):
    registry, _, gate, clock, tid = setup
    registry.set_quota("acme", actor="test", requests_per_minute=2)
    for _ in range(2):
        gate.settle(gate.admit(tid, 10), 10)  # the 2nd request is exactly at the limit
    with pytest.raises(QuotaExceeded) as e:
        gate.admit(tid, 10)
    assert e.value.status == 429 and e.value.limit == "requests_per_minute"
    assert e.value.headers["Retry-After"] == "50"  # 10 s into the minute
    assert e.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert e.value.headers["x-ratelimit-limit-requests"] == "2"
    assert e.value.headers["x-ratelimit-reset-requests"] == "50s"
    clock.t = START + 59.999
    with pytest.raises(QuotaExceeded):
        gate.admit(tid, 10)
    clock.t = START + 60  # the next minute starts from zero
    gate.admit(tid, 10)
    assert gate.headers(tid)["x-ratelimit-remaining-requests"] == "1"


def test_tokens_per_minute_reserves_the_estimate_and_settles_what_was_used(setup):
    registry, _, gate, _, tid = setup
    registry.set_quota("acme", actor="test", tokens_per_minute=100)
    ticket = gate.admit(tid, 60)  # prompt + max_tokens
    assert ticket.headers["x-ratelimit-remaining-tokens"] == "40"
    assert gate.headers(tid)["x-ratelimit-remaining-tokens"] == "40"
    with pytest.raises(QuotaExceeded, match="tokens per minute") as e:
        gate.admit(tid, 41)  # would go one over
    assert e.value.limit == "tokens_per_minute"
    gate.admit(tid, 40)  # exactly at the limit
    gate.settle(ticket, 20)  # it used less than it could have: the rest is free again
    assert gate.headers(tid)["x-ratelimit-remaining-tokens"] == "40"


def test_a_request_larger_than_the_whole_minute_says_so(setup):
    registry, _, gate, _, tid = setup
    registry.set_quota("acme", actor="test", tokens_per_minute=100)
    with pytest.raises(QuotaExceeded, match="lower max_tokens") as e:
        gate.admit(tid, 101)
    assert e.value.code == "request_too_large"


def test_racing_requests_for_the_last_tokens_admit_exactly_what_fits(setup):
    registry, _, gate, _, tid = setup
    registry.set_quota("acme", actor="test", tokens_per_minute=250, max_concurrent=10)
    admitted, refused = 0, 0
    for _ in range(5):  # the event loop decides one after another; each check reserves at once
        try:
            gate.admit(tid, 100)
            admitted += 1
        except QuotaExceeded:
            refused += 1
    assert (admitted, refused) == (2, 3)


def test_concurrency_defaults_to_the_server_setting_and_frees_on_settle(setup):
    registry, _, gate, _, tid = setup
    tickets = [gate.admit(tid, 1) for _ in range(3)]
    with pytest.raises(QuotaExceeded, match="limit 3") as e:
        gate.admit(tid, 1)
    assert e.value.limit == "max_concurrent" and e.value.headers["Retry-After"] == "1"
    gate.settle(tickets[0], 1)
    gate.admit(tid, 1)
    registry.set_quota("acme", actor="test", max_concurrent=5)
    gate.admit(tid, 1)


def test_the_monthly_budget_counts_the_ledger_and_resets_with_the_month(setup):
    registry, ledger, gate, clock, tid = setup
    registry.set_quota("acme", actor="test", monthly_tokens=1000)
    now = datetime.fromtimestamp(clock.t, UTC)
    registry.add_usage({UsageKey(tid, "k", "a", "v1", hour_of(now)): (3, 0, 500, 400, 0)})
    gate.admit(tid, 100)  # 900 used + 100: exactly the budget
    with pytest.raises(QuotaExceeded, match="monthly token budget") as e:
        gate.admit(tid, 1)
    assert e.value.code == "insufficient_quota" and e.value.limit == "monthly_tokens"
    assert int(e.value.headers["Retry-After"]) == pytest.approx(29 * 86400 + 6 * 3600 - 10, abs=2)
    clock.t = datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    gate.admit(tid, 900)  # a new month: last month's usage is not counted


def test_a_new_gate_sees_usage_still_waiting_in_the_ledger_buffer(setup):
    registry, ledger, _, clock, tid = setup
    registry.set_quota("acme", actor="test", monthly_tokens=100)
    ledger.record(UsageKey(tid, "k", "a", "v1", hour_of(datetime.fromtimestamp(clock.t, UTC))),
                  errors=0, prompt_tokens=60, completion_tokens=40)
    gate = QuotaGate(registry, ledger, default_max_concurrent=3, clock=clock)
    with pytest.raises(QuotaExceeded):
        gate.admit(tid, 1)


def test_no_headers_for_limits_a_tenant_does_not_have(setup):
    registry, _, gate, _, tid = setup
    assert gate.headers(tid) == {}
    registry.set_quota("acme", actor="test", tokens_per_minute=10)
    assert set(gate.headers(tid)) == {"x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                                      "x-ratelimit-reset-tokens"}


def test_reset_durations_read_like_openais():
    assert _duration(0.25) == "250ms"
    assert _duration(1.0) == "1s"
    assert _duration(59.9) == "59s"
    assert _duration(360) == "6m0s"

"""Admission against each tenant's quota, and OpenAI's x-ratelimit-* headers.

Requests and tokens per minute count in fixed windows of one clock minute (UTC): at the minute's
boundary both start again from zero. A request is admitted when it fits: one more request, and
its prompt plus the most it may generate (n x max_tokens) within what is left of the minute's
tokens and of the month's budget. When it finishes, that estimate is replaced by what it really
used (prompt + completion tokens, as the ledger counts them). Every check and reservation runs
on the event loop without awaiting in between, so two requests racing for the last tokens are
decided one after the other: at most one of them gets in.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from loraplex.registry import Registry
from loraplex.registry.ledger import LedgerWriter, month_bounds
from loraplex.registry.quotas import Quota
from loraplex.server.protocol import OpenAIError

WINDOW_SECONDS = 60


@dataclass
class _TenantState:
    window: int = -1  # which minute (epoch seconds // 60) the counts below are for
    requests: int = 0
    tokens: int = 0
    in_flight: int = 0
    month: str = ""  # the month (its first hour bucket) month_tokens counts
    month_tokens: int = 0


@dataclass
class Ticket:
    """One admitted request's reservation, settled when it finishes."""

    tenant_id: int
    window: int
    month: str
    reserved_tokens: int
    quota: Quota  # as it was read at admission (its tier weighs the request in the engine)
    headers: dict[str, str]  # the x-ratelimit-* standing with this request counted


class QuotaExceeded(OpenAIError):
    """A 429 naming the limit; `limit` is the metrics label."""

    def __init__(self, limit: str, message: str, retry_after: float, headers: dict[str, str],
                 code: str = "rate_limit_exceeded"):
        headers = headers | {"Retry-After": str(max(1, math.ceil(retry_after)))}
        type_ = "insufficient_quota" if code == "insufficient_quota" else "rate_limit_error"
        super().__init__(429, message, type_, code=code, headers=headers)
        self.limit = limit


class QuotaGate:
    def __init__(self, registry: Registry, ledger: LedgerWriter, default_max_concurrent: int,
                 clock=time.time):
        self.registry = registry
        self.ledger = ledger
        self.default_max_concurrent = default_max_concurrent
        self.clock = clock
        self._tenants: dict[int, _TenantState] = {}

    def _state(self, tenant_id: int, now: float) -> _TenantState:
        state = self._tenants.setdefault(tenant_id, _TenantState())
        window = int(now // WINDOW_SECONDS)
        if state.window != window:
            state.window, state.requests, state.tokens = window, 0, 0
        start, end = month_bounds(datetime.fromtimestamp(now, UTC))
        if state.month != start:  # first use in this process, or a new month: from the ledger
            state.month = start
            state.month_tokens = (self.registry.tokens_between(tenant_id, start, end)
                                  + self.ledger.pending_tokens(tenant_id, start, end))
        return state

    def admit(self, tenant_id: int, estimated_tokens: int) -> Ticket:
        """Reserve one request of up to `estimated_tokens`, or raise QuotaExceeded."""
        now = self.clock()
        quota = self.registry.quota_of(tenant_id)
        state = self._state(tenant_id, now)
        headers = self._headers(quota, state, now)
        to_minute = WINDOW_SECONDS - now % WINDOW_SECONDS
        concurrent = quota.max_concurrent or self.default_max_concurrent
        if state.in_flight >= concurrent:
            raise QuotaExceeded("max_concurrent", f"too many concurrent requests for this "
                                f"tenant (limit {concurrent}); retry when one finishes", 1,
                                headers)
        rpm = quota.requests_per_minute
        if rpm is not None and state.requests + 1 > rpm:
            raise QuotaExceeded("requests_per_minute", f"rate limit reached: {rpm} requests "
                                "per minute", to_minute, headers)
        tpm = quota.tokens_per_minute
        if tpm is not None and estimated_tokens > tpm:
            raise QuotaExceeded("tokens_per_minute", f"this request may use {estimated_tokens} "
                                f"tokens (prompt + max_tokens), more than this tenant's limit of "
                                f"{tpm} tokens per minute: lower max_tokens", to_minute, headers,
                                code="request_too_large")
        if tpm is not None and state.tokens + estimated_tokens > tpm:
            raise QuotaExceeded("tokens_per_minute", f"rate limit reached: {tpm} tokens per "
                                f"minute ({state.tokens} used or reserved; this request may use "
                                f"{estimated_tokens}, its prompt + max_tokens)", to_minute,
                                headers)
        budget = quota.monthly_tokens
        if budget is not None and state.month_tokens + estimated_tokens > budget:
            _, end = month_bounds(datetime.fromtimestamp(now, UTC))
            to_month = datetime.fromisoformat(end).replace(tzinfo=UTC).timestamp() - now
            raise QuotaExceeded("monthly_tokens", f"monthly token budget reached: {budget} "
                                f"tokens ({state.month_tokens} used or reserved this month; this "
                                f"request may use {estimated_tokens})", to_month, headers,
                                code="insufficient_quota")
        state.in_flight += 1
        state.requests += 1
        state.tokens += estimated_tokens
        state.month_tokens += estimated_tokens
        return Ticket(tenant_id, state.window, state.month, estimated_tokens, quota,
                      self._headers(quota, state, now))

    def settle(self, ticket: Ticket, used_tokens: int) -> None:
        """The request finished having used `used_tokens`: replace its estimate."""
        state = self._tenants[ticket.tenant_id]
        state.in_flight -= 1
        if state.window == ticket.window:
            state.tokens += used_tokens - ticket.reserved_tokens
        if state.month == ticket.month:
            state.month_tokens += used_tokens - ticket.reserved_tokens

    def headers(self, tenant_id: int) -> dict[str, str]:
        """The x-ratelimit-* headers of the tenant's current standing."""
        now = self.clock()
        return self._headers(self.registry.quota_of(tenant_id), self._state(tenant_id, now), now)

    def _headers(self, quota: Quota, state: _TenantState, now: float) -> dict[str, str]:
        """Headers for each per-minute limit the tenant has (none for an unlimited kind)."""
        reset = _duration(WINDOW_SECONDS - now % WINDOW_SECONDS)
        headers = {}
        for kind, limit, used in (("requests", quota.requests_per_minute, state.requests),
                                  ("tokens", quota.tokens_per_minute, state.tokens)):
            if limit is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, limit - used))
                headers[f"x-ratelimit-reset-{kind}"] = reset
        return headers

    def in_flight(self) -> int:
        return sum(s.in_flight for s in self._tenants.values())


def _duration(seconds: float) -> str:
    """OpenAI's reset format: "1s", "6m0s", "250ms"."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    whole = int(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"

"""Who is calling: the key in `Authorization: Bearer <key>`, and throttling of failed attempts.

Failed authentications are counted per client address over a sliding window; past the limit,
that address's failures are answered 429 (with Retry-After) instead of 401, until the window
has room again. A request from a throttled address is still checked, and a valid key still
works: an attacker sharing an address (a NAT, a proxy) with a tenant must not be able to lock
the tenant out, and checking costs one indexed lookup. Answering a throttled guess does not
help guessing: a secret is 256 random bits. What the throttle buys is that a brute-force or
stolen-key-list loop is told to back off, is cheap to answer, and shows as 429s in the metrics.
"""

import math
import threading
import time
from collections import OrderedDict, deque

from fastapi import Request

from loraplex.server.protocol import OpenAIError


def bearer_key(request: Request) -> str:
    """The bearer token, or "" when the header is missing or malformed (authenticates no one)."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


class FailedAuthThrottle:
    """Failures per client address in the last `window_s` seconds; at most `max_addresses`
    addresses are tracked (the least recently failing one is forgotten first), so a flood
    from many addresses costs bounded memory."""

    def __init__(self, max_failures: int, window_s: float, max_addresses: int,
                 clock=time.monotonic):
        self.max_failures, self.window_s, self.max_addresses = max_failures, window_s, max_addresses
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()  # sync dependencies run on FastAPI's thread pool

    def failed(self, address: str) -> float | None:
        """Count a failure; the seconds to wait when the address is over its limit, else None."""
        with self._lock:
            now = self._clock()
            failures = self._failures.pop(address, None) or deque(maxlen=self.max_failures + 1)
            while failures and failures[0] <= now - self.window_s:
                failures.popleft()
            failures.append(now)
            self._failures[address] = failures  # most recent last
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)
            if len(failures) <= self.max_failures:
                return None
            # Room again once the oldest failure still counted leaves the window.
            return failures[0] + self.window_s - now

    def num_addresses(self) -> int:
        return len(self._failures)


class Authenticator:
    """The one place a request's key is checked (tenant, admin and tenant-data routes)."""

    def __init__(self, registry, throttle: FailedAuthThrottle, rejected=None):
        """`rejected`: the server's rejected-requests counter (by reason), if any."""
        self.registry, self.throttle, self.rejected = registry, throttle, rejected

    def principal(self, request: Request):
        """The principal behind the request's key; None for no valid key (counted against the
        client's address: over the limit, a 429 is raised instead)."""
        return self.principal_of(bearer_key(request), request)

    def principal_of(self, key: str, request: Request):
        """principal() for a key given otherwise (the console's sign-in form)."""
        principal = self.registry.authenticate(key)
        if principal is None:
            address = request.client.host if request.client else "unknown"
            wait_s = self.throttle.failed(address)
            if wait_s is not None:
                if self.rejected is not None:
                    self.rejected.labels("auth_throttled").inc()
                raise OpenAIError(429, "too many failed authentications from this address; "
                                  "retry later", "rate_limit_error", code="auth_throttled",
                                  headers={"Retry-After": str(max(1, math.ceil(wait_s)))})
        return principal

    def admin(self, request: Request):
        """The admin principal behind the request's key, or a 401."""
        principal = self.principal(request)
        if principal is None or principal.role != "admin":
            raise OpenAIError(401, "an admin key is required", "authentication_error",
                              code="invalid_api_key")
        return principal

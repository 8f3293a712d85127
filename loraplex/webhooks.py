"""Webhooks: events POSTed to a tenant's endpoints, signed the Standard Webhooks way (OpenAI's).

Each delivery carries `webhook-id` (the event's id, the same on every retry, so a receiver can
drop duplicates), `webhook-timestamp` (Unix seconds of the attempt) and `webhook-signature`
("v1," + base64 HMAC-SHA256 of "{id}.{timestamp}.{body}" under the endpoint's secret, a
"whsec_" + base64 string; after a rotation that keeps the old secret for a while, one such
signature per secret, space-separated): what the official openai client's `webhooks.unwrap()`
checks.

A delivery succeeds on any 2xx answer; otherwise it is tried again after each of
RETRY_DELAYS_S, then recorded as failed. Every attempt is recorded (registry table
webhook_deliveries); deliveries a restart cut short are resumed at start.

The URL is a tenant's input, so the server must not become a way into its own network: only
https, to a public address (checked when the endpoint is set and again, after DNS, at every
attempt, since a name may change what it points to), no redirects followed. An operator
serving on a closed network may allow http and private addresses (`allow_private`).
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import ipaddress
import json
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from loraplex.registry.fine_tuning import FineTuningStore

EVENT_TYPES = ("fine_tuning.job.succeeded", "fine_tuning.job.failed",
               "fine_tuning.job.cancelled")
RETRY_DELAYS_S = (5.0, 30.0, 120.0, 600.0, 1800.0)  # after the first attempt fails
TIMEOUT_S = 10.0  # per attempt


class WebhookError(ValueError):
    """A URL we will not deliver to; the message says why."""


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_hint(secret: str) -> str:
    return f"whsec_...{secret[-4:]}"


def sign(secret: str, webhook_id: str, timestamp: int, body: str) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def check_url(url: str, *, allow_private: bool) -> None:
    """Refuse a URL we would not deliver to, before any network use."""
    parts = urlsplit(url)
    schemes = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in schemes or not parts.hostname:
        raise WebhookError(f"url must be an {' or '.join(schemes)} URL with a host, got {url!r}")
    if len(url) > 2048:
        raise WebhookError("url is longer than 2048 characters")


def check_destination(url: str, *, allow_private: bool) -> None:
    """check_url, then refuse a host that resolves to a private, loopback or other
    non-public address (unless allowed)."""
    check_url(url, allow_private=allow_private)
    if allow_private:
        return
    parts = urlsplit(url)
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise WebhookError(f"cannot resolve {parts.hostname}: {e}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise WebhookError(f"{parts.hostname} resolves to a non-public address ({address})")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a 3xx is then an answer like any other non-2xx: retried, never followed


_OPENER = urllib.request.build_opener(_NoRedirects)


class WebhookSender:
    """Delivers events on a thread of its own; `close()` stops it (pending deliveries stay
    pending in the registry and resume at the next start)."""

    def __init__(self, store: FineTuningStore, *, allow_private: bool = False,
                 retry_delays_s: tuple[float, ...] = RETRY_DELAYS_S):
        self.store, self.allow_private, self.retry_delays_s = store, allow_private, retry_delays_s
        self._due: list[tuple[float, int, dict]] = []  # (when, delivery seq, delivery row)
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        for delivery in store.pending_deliveries():
            self._schedule(delivery, 0.0)
        self._thread.start()

    def publish(self, tenant_id: int, event_type: str, data: dict) -> None:
        """Queue `event_type` for every endpoint of the tenant subscribed to it."""
        event = {"id": f"evt_{secrets.token_hex(12)}", "object": "event",
                 "created_at": int(time.time()), "type": event_type, "data": data}
        payload = json.dumps(event)
        for endpoint in self.store.endpoints_for(tenant_id, event_type):
            seq = self.store.add_delivery(event["id"], endpoint["id"], event_type, payload)
            self._schedule({"seq": seq, "event_id": event["id"], "endpoint_id": endpoint["id"],
                            "payload": payload, "attempts": 0}, 0.0)

    def send_test(self, tenant_id: int, endpoint: dict, event_type: str) -> int:
        """One signed delivery of a sample event, now; the receiver's status code."""
        event = {"id": f"evt_{secrets.token_hex(12)}", "object": "event",
                 "created_at": int(time.time()), "type": event_type,
                 "data": {"id": "ftjob-test"}}
        _, secrets_now = self.store.delivery_target(endpoint["id"], event["created_at"])
        status, error = self._post(endpoint["url"], secrets_now, event["id"], json.dumps(event))
        if status is None:
            raise WebhookError(f"the test delivery failed: {error}")
        return status

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=TIMEOUT_S + 1)

    # -- the delivery thread -----------------------------------------------------------------
    def _schedule(self, delivery: dict, delay_s: float) -> None:
        with self._wake:
            heapq.heappush(self._due, (time.monotonic() + delay_s, delivery["seq"], delivery))
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (not self._due or
                                            self._due[0][0] > time.monotonic()):
                    self._wake.wait(None if not self._due else
                                    self._due[0][0] - time.monotonic())
                if self._closed:
                    return
                _, _, delivery = heapq.heappop(self._due)
            self._attempt(delivery)

    def _attempt(self, delivery: dict) -> None:
        target = self.store.delivery_target(delivery["endpoint_id"], int(time.time()))
        if target is None:
            return  # the endpoint was deleted, and its deliveries with it
        url, signing_secrets = target
        status, error = self._post(url, signing_secrets, delivery["event_id"],
                                   delivery["payload"])
        attempt = delivery["attempts"]
        if status is not None and 200 <= status < 300:
            outcome = "delivered"
        elif attempt < len(self.retry_delays_s) and not (error or "").startswith("refused"):
            outcome = "pending"
        else:
            outcome = "failed"
        self.store.record_attempt(delivery["seq"], status=outcome, status_code=status,
                                  error=error)
        if outcome == "pending":
            self._schedule({**delivery, "attempts": attempt + 1}, self.retry_delays_s[attempt])

    def _post(self, url: str, signing_secrets: list[str], event_id: str, payload: str
              ) -> tuple[int | None, str | None]:
        """(status code, None) for any answer; (None, why) when there was none."""
        try:
            check_destination(url, allow_private=self.allow_private)
        except WebhookError as e:
            return None, f"refused: {e}"
        timestamp = int(time.time())
        request = urllib.request.Request(url, data=payload.encode(), method="POST", headers={
            "content-type": "application/json", "user-agent": "loraplex-webhooks",
            "webhook-id": event_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": " ".join(sign(secret, event_id, timestamp, payload)
                                          for secret in signing_secrets)})
        try:
            with _OPENER.open(request, timeout=TIMEOUT_S) as response:
                return response.status, None
        except urllib.error.HTTPError as e:
            return e.code, f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            return None, f"{type(e).__name__}: {e}"

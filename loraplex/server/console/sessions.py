"""Console sessions: a key typed once at sign-in is exchanged for a random session id.

The cookie holds only the session id (256 random bits), never the key; the store maps it to the
principal the key authenticated and the session's CSRF token. Sessions live in this process's
memory: a restart signs everyone out, which for an operator console is the safe direction.
Each session expires `lifetime_s` after sign-in; at most `max_sessions` are kept (the oldest
is signed out first), so a sign-in flood costs bounded memory. Every request also re-checks
that the key is still usable, so revoking a key (or its rotation's end) signs its sessions out.
"""

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from loraplex.registry import ADMIN, NotFound, Principal, Registry
from loraplex.registry.db import now

COOKIE = "loraplex_console"
COOKIE_PATH = "/console"


@dataclass(frozen=True)
class Session:
    id: str  # the cookie's value
    principal: Principal  # who signed in: an admin key or one tenant's key
    csrf: str  # sent back with every change, as a form field or the X-CSRF-Token header
    expires_at: float  # on the store's clock

    @property
    def is_admin(self) -> bool:
        return self.principal.role == ADMIN

    @property
    def actor(self) -> str:
        """Who acts, in the audit log's words (as the HTTP API writes it)."""
        prefix = "admin-key" if self.is_admin else "key"
        return f"{prefix}:{self.principal.key_id}"


class SessionStore:
    def __init__(self, lifetime_s: float, max_sessions: int, clock=time.monotonic):
        self.lifetime_s, self.max_sessions, self._clock = lifetime_s, max_sessions, clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # oldest first
        self._lock = threading.Lock()

    def create(self, principal: Principal) -> Session:
        session = Session(secrets.token_urlsafe(32), principal, secrets.token_urlsafe(32),
                          self._clock() + self.lifetime_s)
        with self._lock:
            self._sessions[session.id] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str) -> Session | None:
        """The live session with this id; None for an unknown or expired one (then dropped)."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and self._clock() >= session.expires_at:
                del self._sessions[session_id]
                return None
            return session

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)


def key_is_usable(registry: Registry, principal: Principal) -> bool:
    """Whether the key behind a session still authenticates (not revoked, not expired)."""
    try:
        keys = (registry.list_admin_keys() if principal.role == ADMIN
                else registry.list_keys(principal.tenant_name))
    except NotFound:  # its tenant is gone
        return False
    at = now()
    return any(k.key_id == principal.key_id and k.is_usable(at) for k in keys)

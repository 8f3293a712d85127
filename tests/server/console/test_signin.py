"""Signing in and out: the key becomes a server-side session (the cookie holds no key), with
HttpOnly, SameSite=Strict and Secure-over-HTTPS flags; sessions expire and end with a
revoked key."""

import httpx
from fastapi.testclient import TestClient

from loraplex.server.console.sessions import COOKIE, SessionStore
from tests.server.console.conftest import sign_in


def test_a_bad_key_is_refused_with_a_page(console_server):
    client = httpx.Client(base_url=console_server.url)
    response = client.post("/console/signin", data={"key": "lpx_nope"})
    assert response.status_code == 401
    assert "not valid" in response.text and COOKIE not in client.cookies
    assert client.post("/console/signin", data={}).status_code == 401  # no key at all


def test_pages_need_a_session(console_server):
    client = httpx.Client(base_url=console_server.url)
    for path in ("/console/tenants", "/console/tenants/acme", "/console/engine",
                 "/console/playground"):
        response = client.get(path)
        assert response.status_code == 303 and response.headers["location"] == "/console/signin"
    htmx = client.get("/console/engine/stats", headers={"hx-request": "true"})
    assert htmx.headers["hx-redirect"] == "/console/signin"


def test_the_cookie_holds_a_session_id_with_strict_flags(console_server):
    for base_url, secure in (("http://testserver", False), ("https://testserver", True)):
        client = TestClient(console_server.app, base_url=base_url, follow_redirects=False)
        key = console_server.keys["admin"]
        response = client.post("/console/signin", data={"key": key})
        assert response.status_code == 303 and response.headers["location"] == "/console/tenants"
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
        assert ("Secure" in cookie) == secure
        secret = key.split("_", 2)[2]  # lpx_<key_id>_<secret>; the secret may hold "_" too
        assert key not in cookie and secret not in cookie


def test_sign_in_from_another_site_is_refused(console_server):
    client = httpx.Client(base_url=console_server.url)
    response = client.post("/console/signin", data={"key": console_server.keys["admin"]},
                           headers={"origin": "https://evil.example"})
    assert response.status_code == 403 and COOKIE not in client.cookies


def test_sign_out_ends_the_session(console_server):
    client, csrf = sign_in(console_server, "admin")
    cookie = client.cookies[COOKIE]
    assert client.post("/console/signout", data={}).status_code == 403  # no CSRF token
    response = client.post("/console/signout", data={"csrf": csrf})
    assert response.status_code == 303
    # The old cookie, replayed, is worthless: the session is gone on the server.
    replay = httpx.Client(base_url=console_server.url, cookies={COOKIE: cookie})
    assert replay.get("/console/tenants").status_code == 303


def test_sessions_expire(console_server):
    client, _ = sign_in(console_server, "admin")
    sessions = console_server.app.state.console.sessions
    clock = sessions._clock
    try:
        sessions._clock = lambda: clock() + sessions.lifetime_s + 1
        assert client.get("/console/tenants").headers["location"] == "/console/signin"
    finally:
        sessions._clock = clock


def test_a_revoked_key_signs_its_sessions_out(console_server):
    registry = console_server.registry
    key_id, key = registry.create_key("acme", actor="test")
    client = httpx.Client(base_url=console_server.url)
    assert client.post("/console/signin", data={"key": key}).status_code == 303
    assert client.get("/console/tenants/acme").status_code == 200
    registry.revoke_key(key_id, actor="test")
    assert client.get("/console/tenants/acme").status_code == 303


def test_the_store_is_bounded_and_expires_sessions():
    now = [0.0]
    store = SessionStore(lifetime_s=10, max_sessions=2, clock=lambda: now[0])
    first, second, third = (store.create(object()) for _ in range(3))
    assert store.get(first.id) is None and store.get(third.id) is third  # oldest signed out
    assert first.csrf != second.csrf and len(first.id) >= 43
    now[0] = 10.0
    assert store.get(second.id) is None and len(store) == 1

"""Who may do what: every change needs the session's CSRF token; a tenant's session sees and
changes only its own tenant (direct URLs and forged posts to another's get 403 or 404, as the
API answers), and never the operator's pages."""

import pytest

from tests.server.console.conftest import sign_in

# Every state change the console offers, with a body that would succeed given the token.
CHANGES = [
    ("/console/tenants", {"name": "csrf-made"}),
    ("/console/tenants/acme/keys", {}),
    ("/console/tenants/acme/quota", {"tier": "2"}),
    ("/console/tenants/acme/base-model", {"allowed": "on"}),
    ("/console/tenants/acme/adapters/bot/promote", {"version": "v1"}),
    ("/console/tenants/acme/adapters/bot/rollback", {}),
    ("/console/tenants/acme/adapters/bot/split", {"weight_v1": "100"}),
    ("/console/tenants/acme/adapters/bot/prewarm", {}),
    ("/console/tenants/acme/datasets/faq/delete", {"confirm": "faq"}),
    ("/console/tenants/acme/training", {"dataset": "faq", "adapter": "x"}),
    ("/console/tenants/acme/training/train-0/cancel", {}),
    ("/console/tenants/acme/exports", {"version": "bot@v1", "kind": "merged", "dtype": "f16"}),
    ("/console/engine/prewarm", {"adapter": "acme/bot"}),
    ("/console/signout", {}),
]


@pytest.mark.parametrize(("path", "body"), CHANGES, ids=[path for path, _ in CHANGES])
def test_a_change_without_the_csrf_token_is_refused(console_server, path, body):
    client, csrf = sign_in(console_server, "admin")
    audit_before = console_server.registry.audit_log(limit=1)
    for forged in ({}, {"csrf": "not-the-token"}):
        response = client.post(path, data=body | forged)
        assert response.status_code == 403, (path, response.text)
        assert "CSRF" in response.text
    assert console_server.registry.audit_log(limit=1) == audit_before  # nothing changed


def test_the_playground_needs_the_csrf_header(console_server):
    client, csrf = sign_in(console_server, "acme")
    ask = {"tenant": "acme", "model": "bot", "max_tokens": 4,
           "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/console/playground/chat", json=ask).status_code == 403
    response = client.post("/console/playground/chat", json=ask, headers={"x-csrf-token": csrf})
    assert response.status_code == 200 and "data: [DONE]" in response.text


OTHER_TENANT_PAGES = ["/console/tenants/acme", "/console/tenants/acme/adapters",
                      "/console/tenants/acme/adapters/bot",
                      "/console/tenants/acme/adapters/bot/stats",
                      "/console/tenants/acme/datasets", "/console/tenants/acme/training",
                      "/console/tenants/acme/training/jobs", "/console/tenants/acme/usage",
                      "/console/tenants/acme/exports", "/console/playground?tenant=acme"]
OPERATOR_PAGES = ["/console/tenants", "/console/engine", "/console/engine/stats",
                  "/console/usage", "/console/audit"]


def test_a_tenant_cannot_reach_another_tenants_pages(console_server):
    client, _ = sign_in(console_server, "globex")
    for path in OTHER_TENANT_PAGES + OPERATOR_PAGES:
        response = client.get(path)
        assert response.status_code == 403, path
        assert "bot" not in response.text.replace("robot", "")  # nothing of acme's shows
    assert client.get("/console/tenants/globex").status_code == 200
    assert client.get("/console/tenants/nobody").status_code == 403  # no probing for names


def test_forged_posts_to_another_tenants_objects_are_refused(console_server):
    """With its own valid CSRF token: the object-level check refuses them all the same."""
    client, csrf = sign_in(console_server, "globex")
    registry = console_server.registry
    audit_before = registry.audit_log(limit=1)
    for path, body in CHANGES[:-1]:
        response = client.post(path, data=body | {"csrf": csrf})
        assert response.status_code in (403, 404), (path, response.status_code)
    ask = {"tenant": "acme", "model": "bot", "max_tokens": 4,
           "messages": [{"role": "user", "content": "hi"}]}
    response = client.post("/console/playground/chat", json=ask, headers={"x-csrf-token": csrf})
    assert response.status_code == 403
    # Its own tenant name with acme's adapter: resolved for globex, so "not found".
    ask["tenant"], ask["model"] = "globex", "bot:v1"
    mine = client.post("/console/playground/chat", json=ask, headers={"x-csrf-token": csrf})
    assert mine.status_code == 200  # globex's own bot
    assert registry.audit_log(limit=1) == audit_before
    assert registry.get_quota("acme").tier == 1.0


def test_a_tenant_cannot_use_the_operators_changes_on_itself(console_server):
    client, csrf = sign_in(console_server, "globex")
    for path in ("/console/tenants/globex/keys", "/console/tenants/globex/quota",
                 "/console/tenants/globex/adapters/bot/promote",
                 "/console/tenants/globex/exports"):
        assert client.post(path, data={"csrf": csrf, "version": "v1"}).status_code == 403, path

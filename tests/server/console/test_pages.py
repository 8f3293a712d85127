"""Every page renders for the operator and for a tenant; bad input is a clear page, never a
traceback; names, dataset lines and model output with markup are shown as text (XSS)."""

import json
import re

from tests.server.console.conftest import sign_in

MARKUP = '<script>alert(1)</script><img src=x onerror="alert(2)">'


def test_every_operator_page_renders(console_server):
    client, _ = sign_in(console_server, "admin")
    for path in ("/console/tenants", "/console/tenants/acme", "/console/tenants/acme/adapters",
                 "/console/tenants/acme/adapters/bot", "/console/tenants/acme/adapters/bot/stats",
                 "/console/tenants/acme/datasets", "/console/tenants/acme/training",
                 "/console/tenants/acme/exports", "/console/tenants/acme/usage",
                 "/console/usage?group_by=hour", "/console/engine", "/console/engine/stats",
                 "/console/audit?action=adapter.&tenant=acme", "/console/playground",
                 "/console/playground?tenant=globex"):
        response = client.get(path)
        assert response.status_code == 200, (path, response.text[:500])
        assert response.headers["cache-control"] == "no-store"
        assert "script-src" not in response.headers["content-security-policy"]  # self only


def test_static_files_are_served_from_the_package(console_server):
    client, _ = sign_in(console_server, "admin")
    page = client.get("/console/tenants").text
    for asset in re.findall(r'(?:src|href)="(/console/static/[^"]+)"', page):
        assert client.get(asset).status_code == 200, asset
    assert "Zero-Clause BSD" in client.get("/console/static/htmx.min.js").text
    assert "//cdn" not in page and "https://" not in page


def test_bad_input_is_a_clear_page(console_server):
    client, csrf = sign_in(console_server, "admin")
    cases = [("/console/tenants", {"name": "Bad Name!"}, 400, "tenant name"),
             ("/console/tenants", {"name": "acme"}, 409, "acme"),
             ("/console/tenants/acme/quota", {"tier": "lots"}, 400, "tier"),
             ("/console/tenants/acme/adapters/bot/split", {"weight_v1": "60"}, 400, "100"),
             ("/console/tenants/acme/adapters/bot/promote", {"version": "v9"}, 404, "v9"),
             ("/console/tenants/acme/adapters", {"name": "up"}, 400, "files"),
             ("/console/tenants/acme/training", {"dataset": "nope", "adapter": "x",
                                                 "target_q_proj": "on"}, 404,
              "nope"),
             ("/console/tenants/acme/training", {"dataset": "d", "adapter": "x", "rank": "0"},
              400, "rank"),
             ("/console/tenants/acme/exports", {"version": "bot@v1", "kind": "merged",
                                                "dtype": "f99"}, 400, "dtype"),
             ("/console/tenants/acme/datasets/none/delete", {"confirm": "nope"}, 400,
              "confirm")]
    for path, body, status, words in cases:
        response = client.post(path, data=body | {"csrf": csrf})
        assert response.status_code == status, (path, response.status_code, response.text[:300])
        assert words.lower() in response.text.lower() and 'role="alert"' in response.text
        assert "Traceback" not in response.text
    assert client.get("/console/tenants/nobody").status_code == 404
    assert client.get("/console/tenants/acme/adapters/nobody").status_code == 404
    assert client.get("/console/tenants/acme/exports/export-x/gguf").status_code == 404


def test_a_bad_dataset_shows_its_line_numbers(console_server):
    client, csrf = sign_in(console_server, "acme")
    good = json.dumps({"prompt": "a", "completion": "b"})
    data = "\n".join([good, "{not json", good, json.dumps({"prompt": 3})]).encode()
    response = client.post("/console/tenants/acme/datasets", data={"name": "bad", "csrf": csrf},
                           files={"file": ("bad.jsonl", data)})
    assert response.status_code == 400
    assert "line 2: invalid JSON" in response.text and "line 4:" in response.text
    assert "bad" not in {v.name for v in console_server.app.state.console.vault.list("acme")}


def test_markup_is_shown_as_text(console_server):
    """A tenant's adapter name cannot hold markup (names are checked), but dataset lines,
    training errors and model output can: each is escaped."""
    client, csrf = sign_in(console_server, "admin")
    line = json.dumps({"prompt": MARKUP, "completion": 7})  # a bad line, echoed in the error
    response = client.post("/console/tenants/acme/datasets", data={"name": "x", "csrf": csrf},
                           files={"file": ("x.jsonl", line.encode())})
    assert response.status_code == 400 and "<script>" not in response.text
    response = client.post("/console/tenants", data={"name": MARKUP, "csrf": csrf})
    assert response.status_code == 400 and "<script>" not in response.text
    assert "&lt;script&gt;" in response.text
    # An audit entry's details carry text a client chose (here a training job's options).
    console_server.registry.record_audit("test", "test.markup", MARKUP, {"note": MARKUP},
                                         tenant="acme")
    page = client.get("/console/audit?action=test.").text
    assert "<script>" not in page and "<img" not in page and "&lt;script&gt;" in page


def test_model_output_is_streamed_as_data_for_textcontent(console_server):
    """The playground's answer is JSON in SSE: markup the model writes never becomes HTML on
    the server, and playground.js sets it as textContent."""
    client, csrf = sign_in(console_server, "acme")
    ask = {"tenant": "acme", "model": "bot:v1", "max_tokens": 8,
           "messages": [{"role": "user", "content": MARKUP}]}
    response = client.post("/console/playground/chat", json=ask, headers={"x-csrf-token": csrf})
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: {")]
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    script = client.get("/console/static/playground.js").text
    assert "innerHTML" not in script and "textContent" in script


def test_the_playground_has_the_api_body_limit(console_server):
    """Forms may upload (the upload limit); the playground asks as /v1 does (its limit)."""
    client, csrf = sign_in(console_server, "acme")
    huge = {"tenant": "acme", "model": "bot", "messages": [
        {"role": "user", "content": "x" * (console_server.app.state.settings.max_body_bytes)}]}
    response = client.post("/console/playground/chat", json=huge, headers={"x-csrf-token": csrf})
    assert response.status_code == 413

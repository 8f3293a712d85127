"""End to end in a real browser: Debian's chromium driven by Playwright (its executable_path;
never a downloaded browser). An operator signs in, creates a tenant and a key, uploads a
dataset, trains an adapter on the tiny model and watches it finish, uploads a second version,
splits traffic with the keyboard, chats in the playground with both versions side by side,
exports a GGUF and downloads it; the tenant then signs in and cannot reach another tenant.
Screenshots of the main pages go to docs/console/ (shown in the README)."""

import json
import shutil
from pathlib import Path

import pytest

from tests.server.console.conftest import ConsoleServer

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra")
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                "(scripts/_venv.sh installs it with apt when it can)")
SHOTS = Path(__file__).resolve().parents[3] / "docs" / "console"
CHATS = "".join(json.dumps({"messages": [
    {"role": "user", "content": f"Where is order {i}?"},
    {"role": "assistant", "content": f"Order {i} ships today."}]}) + "\n" for i in range(16))
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def sign_in(page, url: str, key: str) -> None:
    page.goto(f"{url}/console")
    page.get_by_label("API key", exact=True).fill(key)
    page.get_by_role("button", name="Sign in").click()


def operator_onboards_a_tenant(page, server: ConsoleServer, tmp_path: Path) -> str:
    """Tenant, key, dataset, a trained v1: returns the tenant's new key."""
    sign_in(page, server.url, server.keys["admin"])
    sync_api.expect(page.get_by_role("heading", name="Tenants", exact=True)).to_be_visible()
    page.get_by_label("Name", exact=True).fill("initech")
    page.get_by_role("button", name="Create tenant").click()
    sync_api.expect(page.get_by_role("heading", name="Tenant initech", exact=True)).to_be_visible()
    page.get_by_role("button", name="Create a key").click()
    key = page.locator("#new-key").input_value()
    assert key.startswith("lpx_")

    page.goto(f"{server.url}/console/tenants/initech/datasets")
    (tmp_path / "faq.jsonl").write_text(CHATS)
    page.get_by_label("Name (a new version if it exists)", exact=True).fill("faq")
    page.get_by_label("JSONL file", exact=True).set_input_files(str(tmp_path / "faq.jsonl"))
    page.get_by_role("button", name="Upload").click()
    sync_api.expect(page.get_by_role("cell", name="16", exact=True)).to_be_visible()
    shot(page, "datasets")

    page.goto(f"{server.url}/console/tenants/initech/training")
    for label, value in (("Adapter (a new version if it exists)", "helper"), ("Rank", "4"),
                         ("Alpha", "8"), ("Max steps (blank: the epochs decide)", "4"),
                         ("Learning rate", "0.01"), ("Held-out fraction", "0.25")):
        page.get_by_label(label, exact=True).fill(value)
    for target in ("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        page.get_by_label(target, exact=True).uncheck()
    page.get_by_role("button", name="Start training").click()
    # htmx polls the jobs table: the browser sees progress, then success, with no reload.
    sync_api.expect(page.locator('tr[data-state="succeeded"]')).to_be_visible(timeout=TIMEOUT_MS)
    sync_api.expect(page.locator("tr[data-state] >> text=→ v1")).to_be_visible()
    shot(page, "training")
    return key


def operator_deploys_and_tries(page, server: ConsoleServer) -> None:
    """A second version uploaded, traffic split 80/20 with the keyboard, both versions asked."""
    adapter = f"{server.url}/console/tenants/initech/adapters"
    page.goto(adapter)
    page.get_by_label("Adapter name", exact=True).fill("helper")
    peft = server.adapters[0]
    page.locator("#a-files").set_input_files(
        [str(peft / "adapter_config.json"), str(peft / "adapter_model.safetensors")])
    page.get_by_role("button", name="Upload").click()
    heading = page.get_by_role("heading", name="Adapter initech/helper", exact=True)
    sync_api.expect(heading).to_be_visible()
    button = page.get_by_role("button", name="Apply split")
    page.get_by_label("v2", exact=True).focus()
    for _ in range(20):
        page.keyboard.press("ArrowRight")
    sync_api.expect(button).to_be_disabled()  # 100 + 20: the total must be 100
    page.get_by_label("v1", exact=True).focus()
    for _ in range(20):
        page.keyboard.press("ArrowLeft")
    sync_api.expect(button).to_be_enabled()
    button.click()
    sync_api.expect(page.locator("#stats")).to_contain_text("80%")
    sync_api.expect(page.locator("#stats")).to_contain_text("20%")
    shot(page, "adapter")

    page.goto(f"{server.url}/console/playground?tenant=initech")
    page.get_by_label("Model", exact=True).first.select_option("helper:v1")
    page.get_by_label("Model", exact=True).last.select_option("helper:v2")
    page.get_by_label("Message", exact=True).fill("Where is order 3? <b>bold?</b>")
    page.get_by_label("Max tokens", exact=True).fill("12")
    page.get_by_role("button", name="Send to both").click()
    sync_api.expect(page.locator('.msg[data-done="true"]')).to_have_count(2, timeout=TIMEOUT_MS)
    assert page.locator(".transcript b").count() == 0  # the prompt's markup stayed text
    shot(page, "playground")


def operator_exports(page, server: ConsoleServer) -> None:
    page.goto(f"{server.url}/console/tenants/initech/exports")
    page.get_by_label("Version", exact=True).select_option("helper@v1")
    page.get_by_label("Weights", exact=True).select_option("f32")
    page.get_by_role("button", name="Export").click()
    sync_api.expect(page.locator('tr[data-state="succeeded"]')).to_be_visible(timeout=TIMEOUT_MS)
    with page.expect_download() as download:
        page.locator('tr[data-state="succeeded"] a[href$="/gguf"]').click()
    path = download.value.path()
    assert Path(path).read_bytes()[:4] == b"GGUF"
    shot(page, "exports")
    for name, path in (("engine", "/console/engine"), ("usage", "/console/usage"),
                       ("audit", "/console/audit?tenant=initech")):
        page.goto(server.url + path)
        shot(page, name)
    page.get_by_role("button", name="Sign out").click()
    sync_api.expect(page.get_by_role("heading", name="Sign in", exact=True)).to_be_visible()


def tenant_stays_in_its_own_tenant(page, server: ConsoleServer, key: str) -> None:
    sign_in(page, server.url, key)
    sync_api.expect(page.get_by_role("heading", name="Tenant initech", exact=True)).to_be_visible()
    assert page.get_by_role("link", name="Tenants").count() == 0  # no operator navigation
    for path in ("/console/tenants/acme", "/console/tenants/acme/datasets",
                 "/console/tenants/acme/adapters/bot", "/console/tenants", "/console/engine"):
        response = page.goto(server.url + path)
        assert response.status == 403, path
        sync_api.expect(page.get_by_role("alert")).to_contain_text("Not allowed")
    page.goto(f"{server.url}/console/tenants/initech")
    # A forged post from the tenant's own page, with its own CSRF token: refused all the same.
    status = page.evaluate("""async () => {
        const body = new URLSearchParams({csrf: document.body.dataset.csrf, confirm: "faq"});
        const r = await fetch("/console/tenants/acme/datasets/faq/delete", {method: "POST", body});
        return r.status; }""")
    assert status == 403
    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    shot(page, "tenant-phone")


def test_the_console_end_to_end(console_server, browser, tmp_path):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(30_000)
    key = operator_onboards_a_tenant(page, console_server, tmp_path)
    operator_deploys_and_tries(page, console_server)
    operator_exports(page, console_server)
    tenant_stays_in_its_own_tenant(page, console_server, key)
    context.close()

"""A GGUF export is the tenant's model in clear: its folder is private, and crypto-shredding the
tenant deletes it (the download is a 404 after)."""

import re
import stat
import time

import httpx

from loraplex.validation import adapter_validator
from loraplex.vault.artifacts import ArtifactSealer
from tests.server.console.conftest import sign_in

GGUF_LINK = re.compile(r'href="(/console/tenants/shredco/exports/[^"]+/gguf)"')


def wait_for_gguf_link(client: httpx.Client, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        page = client.get("/console/tenants/shredco/exports/jobs").text
        assert 'data-state="failed"' not in page, page
        if match := GGUF_LINK.search(page):
            return match.group(1)
        time.sleep(0.2)
    raise AssertionError("the export did not finish")


def test_exports_are_private_and_shredded_with_their_tenant(console_server, bpe_llama_dir):
    registry, home = console_server.registry, console_server.home
    registry.create_tenant("shredco", actor="test")
    registry.push_version("shredco", "bot", console_server.adapters[0], actor="test",
                          validate=adapter_validator(str(bpe_llama_dir)),
                          sealer=ArtifactSealer.for_home(home))
    client, csrf = sign_in(console_server, "admin")
    response = client.post("/console/tenants/shredco/exports",
                           data={"version": "bot@v1", "kind": "adapter-only", "dtype": "f32",
                                 "csrf": csrf})
    assert response.status_code == 303, response.text
    link = wait_for_gguf_link(client)
    assert client.get(link).content[:4] == b"GGUF"
    folder = home / "exports" / "shredco"
    for path in (folder, *folder.iterdir()):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path

    admin = {"Authorization": f"Bearer {console_server.keys['admin']}"}
    response = httpx.delete(f"{console_server.url}/admin/tenants/shredco/vault", headers=admin)
    assert response.status_code == 200, response.text

    assert not folder.exists()
    assert client.get(link).status_code == 404
    assert client.get(link.replace("/gguf", "/modelfile")).status_code == 404

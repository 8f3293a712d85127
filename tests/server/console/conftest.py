"""One loraplex server for the console's tests: the tiny BPE model (its exports load in
llama.cpp), training on, tenants acme and globex with an adapter each, and the keys."""

import re
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from loraplex.config import EngineConfig
from loraplex.engine.async_engine import AsyncEngine
from loraplex.registry import Registry
from loraplex.server.app import ServerSettings, create_app
from loraplex.server.thread import ServerThread
from loraplex.validation import adapter_validator
from loraplex.vault.artifacts import ArtifactSealer
from loraplex.vault.crypto import MASTER_KEY_ENV
from tests.conftest import make_peft_adapter

BASE_NAME = "tiny-base"
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class ConsoleServer:
    url: str
    app: object
    home: Path
    registry: Registry
    keys: dict[str, str]  # "admin", "acme", "globex" -> key
    adapters: list[Path]  # PEFT dirs for the tiny model


@pytest.fixture(scope="package")
def console_server(bpe_llama_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(MASTER_KEY_ENV, raising=False)  # the vault makes its own master key
        home = tmp_path_factory.mktemp("console-home")
        registry = Registry(home)
        validate = adapter_validator(str(bpe_llama_dir))
        adapters = []
        for seed in range(2):
            adapters.append(tmp_path_factory.mktemp(f"peft{seed}"))
            make_peft_adapter(bpe_llama_dir, adapters[-1], r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj"], seed=seed)
        keys = {}
        sealer = ArtifactSealer.for_home(home)
        for tenant, path in (("acme", adapters[0]), ("globex", adapters[1])):
            registry.create_tenant(tenant, actor="test")
            keys[tenant] = registry.create_key(tenant, actor="test")[1]
            registry.push_version(tenant, "bot", path, actor="test", validate=validate,
                                  sealer=sealer)
        keys["admin"] = registry.create_admin_key(actor="test")[1]
        engine = AsyncEngine(EngineConfig(model=str(bpe_llama_dir), max_loras=2, max_cpu_loras=4,
                                          max_lora_rank=8, max_model_len=256,
                                          kv_cache_bytes=1 << 22))
        settings = ServerSettings(base_model_name=BASE_NAME, max_tokens_cap=64)
        app = create_app(engine, registry, settings, validate)
        with ServerThread(app) as url:
            yield ConsoleServer(url, app, home, registry, keys, adapters)


def sign_in(server: ConsoleServer, who: str) -> tuple[httpx.Client, str]:
    """A client signed in as `who`, and its session's CSRF token."""
    client = httpx.Client(base_url=server.url, timeout=60)
    response = client.post("/console/signin", data={"key": server.keys[who]})
    assert response.status_code == 303, response.text
    page = client.get(response.headers["location"])
    assert page.status_code == 200, page.text
    return client, CSRF_RE.search(page.text).group(1)

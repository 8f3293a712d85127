"""A real loraplex server on a free loopback port, with two tenants and their adapters."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from loraplex.config import EngineConfig
from loraplex.engine.async_engine import AsyncEngine
from loraplex.registry import Registry
from loraplex.server.app import ServerSettings, create_app
from loraplex.server.thread import ServerThread
from loraplex.validation import adapter_validator
from loraplex.vault.artifacts import ArtifactSealer

BASE_NAME = "tiny-base"


@dataclass
class LiveServer:
    url: str
    home: Path
    registry: Registry
    keys: dict[str, str]  # tenant -> key
    key_ids: dict[str, str]
    admin_key: str
    adapters: dict[str, Path]  # "tenant/name@vN" -> PEFT dir
    model_dir: Path
    settings: ServerSettings
    engine: AsyncEngine | None = None


@pytest.fixture(scope="module")
def live(sharp_llama_dir, sharp_adapters, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    registry = Registry(home)
    validate = adapter_validator(str(sharp_llama_dir))
    keys, key_ids = {}, {}
    for tenant in ("acme", "globex"):
        registry.create_tenant(tenant, actor="test")
        key_ids[tenant], keys[tenant] = registry.create_key(tenant, actor="test")
    registry.set_base_model_access("acme", True, actor="test")
    adapters = {
        "acme/support@v1": sharp_adapters[0], "acme/support@v2": sharp_adapters[1],
        "acme/sales@v1": sharp_adapters[2], "globex/bot@v1": sharp_adapters[3],
    }
    for spec, path in adapters.items():
        tenant, rest = spec.split("/")
        registry.push_version(tenant, rest.split("@")[0], path, actor="test", validate=validate,
                              sealer=ArtifactSealer.for_home(home))
    _, admin_key = registry.create_admin_key(actor="test")
    engine = AsyncEngine(EngineConfig(model=str(sharp_llama_dir), max_loras=4, max_cpu_loras=8,
                                      max_lora_rank=16, max_model_len=1024,
                                      kv_cache_bytes=1 << 24))
    settings = ServerSettings(base_model_name=BASE_NAME, max_tokens_cap=200,
                              max_concurrent_per_tenant=4, max_body_bytes=64 * 1024)
    with ServerThread(create_app(engine, registry, settings, validate)) as url:
        yield LiveServer(url, home, registry, keys, key_ids, admin_key, adapters,
                         sharp_llama_dir, settings, engine)

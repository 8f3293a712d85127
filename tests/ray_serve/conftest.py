"""A local Ray instance (2 CPUs, no dashboard) serving the gateway and two tiny-model replicas,
with six tenants whose adapters the replicas must share out."""

import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from loraplex.config import EngineConfig
from loraplex.registry import Registry
from loraplex.server.app import ServerSettings
from loraplex.validation import adapter_validator
from loraplex.vault.artifacts import ArtifactSealer

BASE_NAME = "tiny-base"
TENANTS = ("acme", "globex", "initech", "umbrella", "hooli", "stark")
# Each replica's host cache holds three adapters: the six are only all resident if the two
# replicas split them, which is what multiplexed routing should arrive at.
ENGINE = dict(max_loras=2, max_cpu_loras=3, max_lora_rank=16, max_num_seqs=4,
              max_model_len=256, kv_cache_bytes=1 << 24)


@dataclass
class RayService:
    url: str
    keys: dict[str, str]  # tenant -> key; each tenant has one adapter named "bot"
    adapters: dict[str, Path]  # tenant -> PEFT dir
    version_ids: dict[str, int]  # tenant -> the registry's version id (the multiplexed id)
    admin_key: str
    model_dir: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_service(sharp_llama_dir, sharp_adapters, tmp_path_factory):
    import ray
    from ray import serve

    from loraplex.ray_serve.deploy import APP_NAME, build_app

    home = tmp_path_factory.mktemp("home")
    registry = Registry(home)
    validate = adapter_validator(str(sharp_llama_dir))
    keys, adapters, version_ids = {}, {}, {}
    for i, tenant in enumerate(TENANTS):
        registry.create_tenant(tenant, actor="test")
        _, keys[tenant] = registry.create_key(tenant, actor="test")
        adapters[tenant] = sharp_adapters[i]
        version = registry.push_version(tenant, "bot", sharp_adapters[i], actor="test",
                                        validate=validate, sealer=ArtifactSealer.for_home(home))
        version_ids[tenant] = version.id
    registry.set_base_model_access("acme", True, actor="test")
    _, admin_key = registry.create_admin_key(actor="test")

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = EngineConfig(model=str(sharp_llama_dir), **ENGINE)
        settings = ServerSettings(base_model_name=BASE_NAME, max_tokens_cap=200)
        serve.run(build_app(config, home, settings, num_replicas=2, num_cpus_per_replica=0.5),
                  name=APP_NAME, route_prefix="/")
        yield RayService(f"http://127.0.0.1:{port}", keys, adapters, version_ids, admin_key,
                         sharp_llama_dir)
    finally:
        serve.shutdown()
        ray.shutdown()

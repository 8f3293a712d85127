"""Registry fixtures: a fresh home per test and small fake adapter directories.

The registry never parses adapter weights (validation is injected), so a fake adapter is a
config file and a few KB of random bytes. Pushes seal through the vault of the same home, as
the server and the CLI do.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from loraplex.registry import CONFIG_FILE, WEIGHTS_FILE, Registry
from loraplex.vault import Vault
from loraplex.vault.artifacts import ArtifactSealer

TARGET_MODULES = ["q_proj", "v_proj"]


def write_adapter(path: Path, *, seed: int = 0, num_bytes: int = 4096) -> Path:
    """A fake adapter dir whose content is determined by `seed`."""
    path.mkdir(parents=True)
    (path / CONFIG_FILE).write_text(json.dumps({"r": 8, "seed": seed}))
    (path / WEIGHTS_FILE).write_bytes(random.Random(seed).randbytes(num_bytes))
    return path


def fake_validate(files) -> dict:
    return {"rank": 8, "target_modules": TARGET_MODULES}


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def registry(home):
    with Registry(home) as registry:
        yield registry


@pytest.fixture
def sealer(home):
    with Vault(home) as vault:
        yield ArtifactSealer(vault)


@pytest.fixture
def acme(registry):
    return registry.create_tenant("acme", actor="operator")


@pytest.fixture
def push(registry, acme, sealer, tmp_path):
    """push(seed=..., adapter=..., tenant=..., **kwargs): push a fake adapter, return Version."""
    counter = itertools.count()

    def push(*, seed: int = 0, adapter: str = "bot", tenant: str = "acme", **kwargs):
        src = write_adapter(tmp_path / f"src-{next(counter)}", seed=seed)
        kwargs.setdefault("validate", fake_validate)
        return registry.push_version(tenant, adapter, src, actor="alice", sealer=sealer,
                                     **kwargs)

    return push

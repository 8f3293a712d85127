"""Vault fixtures: a fresh home with two tenants, and small valid datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.registry import Registry
from loraplex.vault import Vault
from loraplex.vault.crypto import MASTER_KEY_ENV

# Distinctive strings, to search for in every file under the home.
SECRET_QUESTION = "What is the launch code for project Bluebird?"
SECRET_ANSWER = "The launch code is ZEBRA-4471-QUASAR."


def jsonl(*records: object) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


CHAT = jsonl(
    {"messages": [{"role": "user", "content": SECRET_QUESTION},
                  {"role": "assistant", "content": SECRET_ANSWER}]},
    {"prompt": "Say hi.", "completion": "Hi!"},
)


@pytest.fixture(autouse=True)
def no_master_key_env(monkeypatch):
    """Tests use the key file in the home unless they set the variable themselves."""
    monkeypatch.delenv(MASTER_KEY_ENV, raising=False)


@pytest.fixture
def home(tmp_path) -> Path:
    home = tmp_path / "home"
    with Registry(home) as registry:
        registry.create_tenant("acme", actor="operator")
        registry.create_tenant("globex", actor="operator")
    return home


@pytest.fixture
def vault(home):
    with Vault(home) as vault:
        yield vault

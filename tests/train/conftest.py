"""Training fixtures: a home with tenant acme and a chat dataset "greetings" in its vault."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.registry import Registry
from loraplex.vault import Vault
from loraplex.vault.crypto import MASTER_KEY_ENV

# Distinctive, to search for in files on disk.
SECRET = "Pineapple-7731 is the passphrase"

GREETINGS = "".join(
    json.dumps({"messages": [{"role": "user", "content": f"Hello {i}"},
                             {"role": "assistant", "content": f"Hi {i}! {SECRET}."}]}) + "\n"
    for i in range(12)
).encode()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv(MASTER_KEY_ENV, raising=False)
    home = tmp_path / "home"
    with Registry(home) as registry:
        registry.create_tenant("acme", actor="operator")
    with Vault(home) as vault:
        vault.add("acme", "greetings", GREETINGS, actor="alice")
    return home

"""vault/ knows storage only: never torch, the engine or the server."""

import sys
from pathlib import Path

import loraplex.vault
from tests.registry.test_layering import imported_modules

VAULT_DIR = Path(loraplex.vault.__file__).parent
ALLOWED = ("cryptography", "typer", "rich", "loraplex.vault", "loraplex.registry",
           "loraplex.home", "loraplex.cli_support")


def test_vault_imports_only_storage_modules():
    sources = sorted(VAULT_DIR.glob("*.py"))
    assert sources
    for path in sources:
        for module in imported_modules(path):
            allowed = module.split(".")[0] in sys.stdlib_module_names or any(
                module == name or module.startswith(name + ".") for name in ALLOWED)
            assert allowed, f"{path.name} imports {module}"

"""registry/ knows storage only: it imports the standard library and itself, nothing else
(in particular never torch, the engine or the server)."""

import ast
import sys
from pathlib import Path

import loraplex.registry

REGISTRY_DIR = Path(loraplex.registry.__file__).parent


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module)
    return modules


def test_registry_imports_only_the_standard_library_and_itself():
    sources = sorted(REGISTRY_DIR.glob("*.py"))
    assert sources
    for path in sources:
        for module in imported_modules(path):
            top = module.split(".")[0]
            is_own = module == "loraplex.registry" or module.startswith("loraplex.registry.")
            assert is_own or top in sys.stdlib_module_names, f"{path.name} imports {module}"

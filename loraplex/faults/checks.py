"""What a home must look like after any fault: the checks the crash and disk-full runs apply.

- both SQLite files pass `PRAGMA integrity_check`;
- every adapter version's sealed files decrypt, and their manifest's sha256 is the version's;
- the vault decrypts every dataset version, and its sha256 is the recorded one;
- nothing partial is left: no push temp dir (artifacts/.tmp), no half-written vault file
  (`.*.tmp`), no artifact dir that fails to decrypt, no dataset file without its row;
- an artifact dir no version points to (a push killed between publishing it and inserting the
  version row) is complete and sealed: harmless, and reused when that content is pushed again.
Each problem is one line naming the path; an empty list means the home is sound.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from loraplex.registry import Registry
from loraplex.registry.artifacts import (
    ARTIFACTS_DIR,
    PUSH_LOCK_FILE,
    TMP_DIR,
    manifest_sha256,
)
from loraplex.registry.db import DB_FILE
from loraplex.vault import Vault
from loraplex.vault.artifacts import ArtifactSealer
from loraplex.vault.store import INDEX_FILE, TENANTS_DIR, VAULT_DIR


def integrity_problems(path: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()
    return [] if rows == ["ok"] else [f"{path}: integrity_check says {rows[:5]}"]


def _artifact_problems(home: Path, registry: Registry) -> tuple[list[str], int]:
    """(problems, unreferenced complete artifact dirs)."""
    sealer = ArtifactSealer.for_home(home)
    problems, referenced = [], set()
    for tenant in (t.name for t in registry.list_tenants()):
        for info in registry.list_adapters(tenant):
            for version in info.versions:
                referenced.add(Path(version.artifact_path).resolve())
                where = f"{tenant}/{info.name} v{version.number}"
                try:
                    files = sealer.reader(tenant, version.artifact_path)()
                except Exception as e:  # any failure to read back is the finding
                    problems.append(f"{where}: unreadable: {type(e).__name__}: {e}")
                    continue
                if manifest_sha256(files) != version.sha256:
                    problems.append(f"{where}: sha256 differs from the version's")
    tmp = home / ARTIFACTS_DIR / TMP_DIR
    if tmp.exists():
        problems += [f"{leftover}: a push's temp dir left behind" for leftover in tmp.iterdir()
                     if leftover.name != PUSH_LOCK_FILE]
    unreferenced = 0
    for directory in sorted((home / ARTIFACTS_DIR).glob("*/*")):
        if directory.parent.name == TMP_DIR or directory.resolve() in referenced:
            continue
        try:
            files = sealer.reader(directory.parent.name, directory)()
        except Exception as e:
            problems.append(f"{directory}: unreferenced and unreadable: {e}")
            continue
        if manifest_sha256(files) != directory.name:
            problems.append(f"{directory}: unreferenced and its content is not its name")
        unreferenced += 1
    return problems, unreferenced


def _vault_problems(home: Path, registry: Registry) -> list[str]:
    problems, known = [], set()
    with Vault(home) as vault:
        for tenant in (t.name for t in registry.list_tenants()):
            for version in vault.list(tenant):
                known.add((tenant, version.name, version.label))
                where = f"dataset {tenant}/{version.name} {version.label}"
                try:
                    data = vault.read_bytes(tenant, version.name, version.number)
                except Exception as e:  # any failure to read back is the finding
                    problems.append(f"{where}: does not decrypt: {type(e).__name__}: {e}")
                    continue
                if hashlib.sha256(data).hexdigest() != version.sha256:
                    problems.append(f"{where}: sha256 differs from the recorded one")
    root = home / VAULT_DIR / TENANTS_DIR
    for path in sorted(root.rglob("*")) if root.exists() else []:
        if path.is_file() and path.name.endswith(".tmp"):
            problems.append(f"{path}: a half-written vault file")
        elif path.is_file() and path.suffix == ".enc":
            tenant, name = path.parent.parent.name, path.parent.name
            if (tenant, name, path.stem) not in known:
                problems.append(f"{path}: a dataset file no version row points to")
    return problems


def home_problems(home: Path) -> dict:
    """{"problems": [...], "unreferenced_artifacts": n} for the home as it is now."""
    problems = integrity_problems(home / DB_FILE)
    problems += integrity_problems(home / VAULT_DIR / INDEX_FILE)
    with Registry(home) as registry:
        artifact_problems, unreferenced = _artifact_problems(home, registry)
        problems += artifact_problems + _vault_problems(home, registry)
    return {"problems": problems, "unreferenced_artifacts": unreferenced}

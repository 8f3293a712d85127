"""The vault's file handling: bounded reads, private atomic writes, idempotent deletes."""

import os
import shutil
from pathlib import Path


def read_at_most(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of the file: enough to tell it is too large without reading it all."""
    with open(path, "rb") as reader:
        return reader.read(limit)


def remove_tree(path: Path) -> None:
    """Delete a directory and its files; already gone is fine (an earlier call was cut short)."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass


def write_private(path: Path, data: bytes) -> None:
    """Write the file whole or not at all (temp file, fsync, rename), readable by us only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as writer:
        writer.write(data)
        writer.flush()
        os.fsync(writer.fileno())
    os.replace(tmp, path)


def sweep_partial_writes(root: Path, kept: set[Path]) -> list[Path]:
    """Delete what a writer killed midway left under `root`: half-written temp files
    (`.*.tmp`) and encrypted files (`*.enc`) not in `kept` (written, but their row never
    committed). Call it holding the vault's write lock: every writer writes only while holding
    it, so nothing found here can be a write in progress. Returns what was deleted."""
    removed = []
    for path in sorted(root.rglob("*")) if root.exists() else []:
        is_partial = path.name.startswith(".") and path.name.endswith(".tmp")
        if path.is_file() and (is_partial or (path.suffix == ".enc" and path not in kept)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed

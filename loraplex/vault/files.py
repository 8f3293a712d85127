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

"""The artifact store: adapter files, content-addressed under `<home>/artifacts/<sha256>/`.

store_artifact() copies an adapter into a private temp dir, fsyncs it, lets the caller validate
the copy (never the source, which could change after the check), and only then renames it into
place. A final dir therefore always holds complete, validated files; a crash leaves at most a
temp dir (removed by a later push) or a final dir no version points to (harmless, and reused if
the same content is pushed again). The version row that makes an artifact visible is inserted
by the caller after this returns.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraplex.registry.errors import InvalidInput

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The only files of an adapter dir ever read; anything else a tenant put there is ignored.
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
ARTIFACTS_DIR = "artifacts"
TMP_DIR = ".tmp"
# A temp dir this old belongs to a push that died; a younger one may be a push in progress in
# another process (the server and the CLI can push at the same time), so it is left alone.
ABANDONED_AFTER_S = 3600
_CHUNK_BYTES = 1 << 20

# Given the temp copy; returns {"rank": int, "target_modules": [str, ...]}; raises ValueError
# with a user-facing message to refuse the adapter.
Validate = Callable[[Path], dict]


@dataclass(frozen=True)
class Artifact:
    sha256: str
    path: str  # relative to the home, e.g. "artifacts/<sha256>"
    size_bytes: int
    rank: int | None  # None when the caller did not validate
    target_modules: tuple[str, ...] | None


def store_artifact(home: Path, src_dir: Path, validate: Validate | None) -> Artifact:
    if not src_dir.is_dir():
        raise InvalidInput(f"{src_dir} is not a directory")
    artifacts = home / ARTIFACTS_DIR
    tmp_root = artifacts / TMP_DIR
    tmp_root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(tmp_root)
    tmp = Path(tempfile.mkdtemp(prefix="push-", dir=tmp_root))
    try:
        digests = {name: _copy(src_dir, name, tmp) for name in ADAPTER_FILES}
        _fsync(tmp)
        # The sha256 of a `sha256sum`-style manifest: reproducible with
        # `sha256sum adapter_config.json adapter_model.safetensors | sha256sum`.
        manifest = "".join(f"{digests[name]}  {name}\n" for name in ADAPTER_FILES)
        sha256 = hashlib.sha256(manifest.encode()).hexdigest()
        size_bytes = sum((tmp / name).stat().st_size for name in ADAPTER_FILES)
        rank, target_modules = None, None
        if validate is not None:
            try:
                info = validate(tmp)
            except ValueError as error:
                raise InvalidInput(str(error)) from error
            rank, target_modules = int(info["rank"]), tuple(info["target_modules"])
        _publish(tmp, artifacts / sha256)
        _fsync(artifacts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone when published
    return Artifact(sha256, f"{ARTIFACTS_DIR}/{sha256}", size_bytes, rank, target_modules)


def _copy(src_dir: Path, name: str, dst_dir: Path) -> str:
    """Copy one adapter file (a regular file, not a symlink); returns its sha256 hex."""
    src = src_dir / name
    try:
        mode = os.lstat(src).st_mode
    except FileNotFoundError:
        raise InvalidInput(f"{src_dir} has no {name}") from None
    if stat.S_ISLNK(mode):
        raise InvalidInput(f"{src} is a symlink; push the file itself")
    if not stat.S_ISREG(mode):
        raise InvalidInput(f"{src} is not a regular file")
    digest = hashlib.sha256()
    # O_NOFOLLOW: the file cannot be swapped for a symlink between the check above and here.
    src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    with open(src_fd, "rb") as reader, open(dst_dir / name, "xb") as writer:
        while chunk := reader.read(_CHUNK_BYTES):
            digest.update(chunk)
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    return digest.hexdigest()


def _publish(tmp: Path, final: Path) -> None:
    try:
        os.replace(tmp, final)
    except OSError:
        # A non-empty final dir already exists: the same content was pushed before (or is
        # being pushed right now by another process); the copy there is identical, keep it.
        if not final.is_dir():
            raise


def _remove_abandoned(tmp_root: Path) -> None:
    cutoff = time.time() - ABANDONED_AFTER_S
    for leftover in tmp_root.iterdir():
        try:
            is_abandoned = leftover.stat().st_mtime < cutoff
        except FileNotFoundError:  # another push removed it first
            continue
        if is_abandoned:
            shutil.rmtree(leftover, ignore_errors=True)


def _fsync(directory: Path) -> None:
    """Make a directory's entries (new files, a rename into it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

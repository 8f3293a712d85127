"""The artifact store: adapter files, sealed, under `<home>/artifacts/<tenant>/<sha256>/`.

store_artifact() reads an adapter's two files into memory, lets the caller validate those bytes
(never the source, which could change after the check), has the Sealer encrypt them (the vault
does: the registry never holds a key, see loraplex/vault/artifacts.py), writes the sealed files
into a private temp dir, fsyncs it, and only then renames it into place. A final dir therefore
always holds complete, validated files; a crash leaves at most a temp dir (removed when the
registry is next opened, or by a later push, at a moment no push is in progress: each holds a
shared flock on `.tmp/.lock`, which dies with its process, even by SIGKILL) or a final dir no
version points to (harmless, sealed, and reused if the same content is pushed again). The
version row that makes an artifact visible is inserted by the caller after this returns. No
plaintext of the adapter is written under the home.

An artifact dir is the tenant's own: two tenants pushing identical bytes get two dirs, each
sealed under its tenant's key, so shredding one tenant's key never touches the other's copy.
Homes made before sealing hold clear dirs `artifacts/<sha256>/`; `is_clear` tells them apart
(the vault's reader reads them, and seal_clear_artifacts moves them into the sealed layout).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from loraplex.registry.errors import InvalidInput

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The only files of an adapter dir ever read; anything else a tenant put there is ignored.
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
ARTIFACTS_DIR = "artifacts"
TMP_DIR = ".tmp"
PUSH_LOCK_FILE = ".lock"  # in TMP_DIR: shared by pushes in progress, exclusive to sweep

# Given the adapter's files in memory ({name: bytes}); returns {"rank": int, "target_modules":
# [str, ...]}; raises ValueError with a user-facing message to refuse the adapter.
Validate = Callable[[Mapping[str, bytes]], dict]


class Sealer(Protocol):
    """Encrypts a tenant's adapter files for storage (implemented by the vault)."""

    def seal(self, tenant: str, sha256: str, files: Mapping[str, bytes]) -> dict[str, bytes]:
        """The files to store in the artifact dir ({file name: bytes}) for these plain ones."""
        ...

    def is_intact(self, tenant: str, directory: Path) -> bool:
        """Whether the artifact dir's files decrypt to the content its name says."""
        ...


@dataclass(frozen=True)
class Artifact:
    sha256: str
    path: str  # relative to the home, e.g. "artifacts/<tenant>/<sha256>"
    size_bytes: int  # of the plain adapter files, as pushed
    rank: int | None  # None when the caller did not validate
    target_modules: tuple[str, ...] | None


def artifact_path(tenant: str, sha256: str) -> str:
    """Where a tenant's artifact of this content lives, relative to the home."""
    return f"{ARTIFACTS_DIR}/{tenant}/{sha256}"


def is_clear(relative_path: str) -> bool:
    """True for an artifact stored before sealing: `artifacts/<sha256>`, its files in clear."""
    return len(Path(relative_path).parts) == 2


def store_artifact(home: Path, tenant: str, src_dir: Path, validate: Validate | None,
                   sealer: Sealer) -> Artifact:
    if not src_dir.is_dir():
        raise InvalidInput(f"{src_dir} is not a directory")
    files = {name: _read(src_dir, name) for name in ADAPTER_FILES}
    sha256 = manifest_sha256(files)
    rank, target_modules = None, None
    if validate is not None:
        try:
            info = validate(files)
        except ValueError as error:
            raise InvalidInput(str(error)) from error
        rank, target_modules = int(info["rank"]), tuple(info["target_modules"])
    relative = artifact_path(tenant, sha256)
    write_sealed(home, relative, sealer.seal(tenant, sha256, files),
                 is_intact=lambda final: sealer.is_intact(tenant, final))
    size_bytes = sum(len(data) for data in files.values())
    return Artifact(sha256, relative, size_bytes, rank, target_modules)


def manifest_sha256(files: Mapping[str, bytes]) -> str:
    """The sha256 of a `sha256sum`-style manifest: reproducible with
    `sha256sum adapter_config.json adapter_model.safetensors | sha256sum`."""
    manifest = "".join(f"{hashlib.sha256(files[name]).hexdigest()}  {name}\n"
                       for name in ADAPTER_FILES)
    return hashlib.sha256(manifest.encode()).hexdigest()


def write_sealed(home: Path, relative: str, sealed: Mapping[str, bytes],
                 is_intact: Callable[[Path], bool] | None = None) -> None:
    """Publish the sealed files as the artifact dir `relative`: a no-op if it exists, unless
    `is_intact(dir)` says the existing one is damaged (then the new files replace it, so that
    pushing the same adapter again repairs a corrupted artifact)."""
    artifacts = home / ARTIFACTS_DIR
    tmp_root = artifacts / TMP_DIR
    final = home / relative
    for directory in (artifacts, tmp_root, final.parent):
        directory.mkdir(mode=0o700, exist_ok=True)
    remove_abandoned(home)
    lock = os.open(tmp_root / PUSH_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_SH)  # before the temp dir exists: no sweep removes it
        tmp = Path(tempfile.mkdtemp(prefix="push-", dir=tmp_root))  # mode 0700
        try:
            for name, data in sealed.items():
                _write(tmp / name, data)
            _fsync(tmp)
            _publish(tmp, final, is_intact)
            _fsync(final.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # already gone when published
    finally:
        os.close(lock)


def _read(src_dir: Path, name: str) -> bytes:
    """One adapter file's bytes (a regular file, not a symlink)."""
    src = src_dir / name
    try:
        mode = os.lstat(src).st_mode
    except FileNotFoundError:
        raise InvalidInput(f"{src_dir} has no {name}") from None
    if stat.S_ISLNK(mode):
        raise InvalidInput(f"{src} is a symlink; push the file itself")
    if not stat.S_ISREG(mode):
        raise InvalidInput(f"{src} is not a regular file")
    # O_NOFOLLOW: the file cannot be swapped for a symlink between the check above and here.
    with open(os.open(src, os.O_RDONLY | os.O_NOFOLLOW), "rb") as reader:
        return reader.read()


def _write(path: Path, data: bytes) -> None:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as writer:
        writer.write(data)
        writer.flush()
        os.fsync(writer.fileno())


def _publish(tmp: Path, final: Path, is_intact: Callable[[Path], bool] | None) -> None:
    try:
        os.replace(tmp, final)
        return
    except OSError:
        # A non-empty final dir already exists: the same content was pushed before by this
        # tenant (or is being pushed right now by another process); it seals the same
        # plaintext under the tenant's key, keep it, unless it no longer decrypts.
        if not final.is_dir():
            raise
    if is_intact is None or is_intact(final):
        return
    # Damaged on disk: moved aside into the temp root (swept like a dead push's dir if this
    # one dies here), the new copy renamed into its place. Another push of the same content
    # may win the rename: its copy is as good as ours.
    damaged = Path(tempfile.mkdtemp(prefix="damaged-", dir=tmp.parent))
    os.replace(final, damaged / final.name)
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
    shutil.rmtree(damaged, ignore_errors=True)


def remove_abandoned(home: Path) -> None:
    """Delete the temp dirs of pushes that died, when no push is in progress in any process
    (the server and the CLI may push at the same time): otherwise leave them to a later call."""
    tmp_root = home / ARTIFACTS_DIR / TMP_DIR
    if not tmp_root.is_dir():
        return
    lock = os.open(tmp_root / PUSH_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a push is in progress
        for leftover in tmp_root.iterdir():
            if leftover.name != PUSH_LOCK_FILE:
                shutil.rmtree(leftover, ignore_errors=True)
    finally:
        os.close(lock)


def _fsync(directory: Path) -> None:
    """Make a directory's entries (new files, a rename into it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

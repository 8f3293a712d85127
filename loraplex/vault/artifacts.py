"""Adapter artifacts sealed under their tenant's vault key: the registry stores, this encrypts.

A sealed artifact dir `<home>/artifacts/<tenant>/<sha256>/` holds
    key.sealed                          the artifact's own AES-256 key, wrapped by the tenant's
                                        data key (the vault's envelope: master -> tenant -> this)
    adapter_config.json.sealed          nonce + AES-GCM ciphertext of each adapter file
    adapter_model.safetensors.sealed
Every ciphertext's associated data names the tenant, the artifact and the file, so a file moved
into another tenant's or artifact's dir fails to decrypt rather than being served as its
adapter. Vault.delete_tenant_vault destroys the tenant's data key, so every artifact key of the
tenant, and every copy of its artifacts in a backup, becomes unreadable: crypto-shredding covers
adapters as it covers datasets.

Plaintext exists in memory only: a SealedArtifact, called, returns the decrypted files as
bytes, which the engine parses (safetensors loads from bytes). Tools that only take a directory
(PEFT's from_pretrained to continue training, a GGUF export, which writes the weights in clear
anyway) get one from materialized(): a private temp dir in RAM (/dev/shm) where there is one,
removed on exit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.home import adapter_cache_dir
from loraplex.registry import Registry
from loraplex.registry.artifacts import (
    ADAPTER_FILES,
    ARTIFACTS_DIR,
    artifact_path,
    manifest_sha256,
    write_sealed,
)
from loraplex.vault import crypto
from loraplex.vault.errors import IntegrityError, VaultError
from loraplex.vault.store import Vault

KEY_FILE = "key.sealed"
SEALED_SUFFIX = ".sealed"
RAM_DIR = Path("/dev/shm")  # Linux's tmpfs: a materialized adapter never reaches a disk

# One sealer per home in a process (see ArtifactSealer.for_home): a SealedArtifact unpickled
# in a Ray replica per request must not open a new vault connection each time. A process uses
# one home or a few; beyond that the oldest is dropped (closed once nothing uses it).
_SEALERS: dict[str, ArtifactSealer] = {}
_MAX_SEALERS = 8
_SEALERS_LOCK = threading.Lock()


class ArtifactSealer:
    """The registry's Sealer (registry/artifacts.py), backed by a vault; also opens artifacts."""

    def __init__(self, vault: Vault):
        self.vault = vault

    @classmethod
    def for_home(cls, home: str | Path) -> ArtifactSealer:
        """The process's sealer for this home (opened on first use, kept for the process)."""
        key = str(Path(home).resolve())
        with _SEALERS_LOCK:
            if key not in _SEALERS:
                if len(_SEALERS) >= _MAX_SEALERS:
                    del _SEALERS[next(iter(_SEALERS))]
                _SEALERS[key] = cls(Vault(Path(key)))
            return _SEALERS[key]

    def __reduce__(self):
        # Pickled (into a Ray replica) as its home: the other process opens its own vault. A
        # module-level function, which cloudpickle sends by name (a classmethod it would not).
        return sealer_for_home, (str(self.vault.home),)

    def seal(self, tenant: str, sha256: str, files: Mapping[str, bytes]) -> dict[str, bytes]:
        key = crypto.new_key()
        sealed = {KEY_FILE: self.vault.wrap_key(tenant, key, _aad(tenant, sha256, KEY_FILE))}
        for name, data in files.items():
            sealed[name + SEALED_SUFFIX] = crypto.encrypt(key, data, _aad(tenant, sha256, name))
        return sealed

    def is_intact(self, tenant: str, directory: Path) -> bool:
        """Whether the artifact dir decrypts to the content its name (its sha256) says."""
        try:
            files = self.reader(tenant, directory)()
        except (VaultError, OSError):
            return False
        return manifest_sha256(files) == Path(directory).name

    def reader(self, tenant: str, directory: str | Path) -> SealedArtifact:
        """What reads the tenant's artifact at `directory` (absolute), decrypting in memory."""
        directory = Path(directory).resolve()
        # Stored before sealing, and not moved into the sealed layout yet: read as it is.
        clear = directory.parent == (self.vault.home / ARTIFACTS_DIR).resolve()
        return SealedArtifact(self, tenant, str(directory), clear)


def sealer_for_home(home: str) -> ArtifactSealer:
    return ArtifactSealer.for_home(home)


@dataclass(frozen=True)
class SealedArtifact:
    """An artifact's plain files on demand: call it for {file name: bytes}. Holds no key and
    no plaintext, so it may be kept, compared and pickled freely."""

    sealer: ArtifactSealer = field(repr=False, compare=False)
    tenant: str
    directory: str
    clear: bool  # an artifact of a home from before sealing (artifacts/<sha256>, in clear)

    def __call__(self) -> dict[str, bytes]:
        path = Path(self.directory)
        if self.clear:
            return {name: (path / name).read_bytes() for name in ADAPTER_FILES}
        sha256 = path.name
        where = f"artifact {sha256[:12]} of tenant '{self.tenant}'"
        try:
            wrapped = (path / KEY_FILE).read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"{where} is gone (its tenant's data was deleted?)") from None
        aad = _aad(self.tenant, sha256, KEY_FILE)
        key = self.sealer.vault.unwrap_key(self.tenant, wrapped, aad)
        files = {}
        for name in ADAPTER_FILES:
            plain = crypto.decrypt(key, (path / (name + SEALED_SUFFIX)).read_bytes(),
                                   _aad(self.tenant, sha256, name))
            if plain is None:
                raise IntegrityError(f"{where}: {name} fails its integrity check (modified, "
                                     "corrupted, or moved here from elsewhere)")
            files[name] = plain
        return files


def private_temp_root() -> Path | None:
    """Where plain adapter files may briefly live: RAM (/dev/shm) where there is one, else the
    system's temp dir (None); the dirs made there are 0700."""
    return RAM_DIR if RAM_DIR.is_dir() and os.access(RAM_DIR, os.W_OK) else None


@contextmanager
def materialized(artifact: SealedArtifact) -> Iterator[Path]:
    """The artifact's plain files in a private temp dir (0700, in RAM where /dev/shm exists),
    removed on exit: for tools that read a PEFT directory."""
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-adapter-", dir=private_temp_root()))
    try:
        for name, data in artifact().items():
            with open(os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                      "wb") as writer:
                writer.write(data)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def seal_clear_artifacts(registry: Registry, sealer: ArtifactSealer, *, actor: str) -> int:
    """Seal the clear artifacts of a home made before sealing (the server does this at start):
    each version's files are checked against its sha256, sealed into the tenant's own dir, the
    version pointed there, and clear dirs no version points to any more are deleted. Returns
    how many versions moved; running it again (after a crash) finishes the job."""
    home = registry.home
    moved = registry.clear_artifacts()
    for version_id, tenant, relative in moved:
        sha256 = Path(relative).name
        files = {name: (home / relative / name).read_bytes() for name in ADAPTER_FILES}
        if manifest_sha256(files) != sha256:
            raise IntegrityError(f"{home / relative} does not hold the adapter its version "
                                 f"{version_id} was pushed with (its sha256 differs)")
        sealed = artifact_path(tenant, sha256)
        write_sealed(home, sealed, sealer.seal(tenant, sha256, files))
        registry.move_to_sealed(version_id, sealed, actor=actor)
    for relative in {relative for _, _, relative in moved}:
        shutil.rmtree(home / relative, ignore_errors=True)
    if moved:
        # The serving cache's entries of those artifacts are at its top level, by no tenant:
        # drop them all (a cache; what is still used is packed again, into its tenant's scope).
        for entry in adapter_cache_dir(home).glob("*.safetensors"):
            entry.unlink(missing_ok=True)
    return len(moved)


def _aad(tenant: str, sha256: str, name: str) -> bytes:
    return f"loraplex-artifact:{tenant}/{sha256}/{name}".encode()

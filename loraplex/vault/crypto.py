"""Envelope encryption for the vault, AES-256-GCM throughout.

    master key (env LORAPLEX_MASTER_KEY, else <home>/vault/master.key)
      └─ wraps one data key per tenant (256 random bits, stored only wrapped, in the index)
           └─ encrypts that tenant's dataset files

Destroying a tenant's wrapped data key makes every ciphertext of that tenant unreadable,
wherever copies of it remain (backups, old disks): crypto-shredding. Every ciphertext is bound
by its associated data to what it is (the tenant; the dataset and version), so a file moved
into another place, another tenant's or another version's, fails to decrypt instead of being
read as that place's data.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from loraplex.vault.errors import MasterKeyError

MASTER_KEY_ENV = "LORAPLEX_MASTER_KEY"
MASTER_KEY_FILE = "master.key"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # GCM's standard nonce; random per encryption, stored before the ciphertext


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """nonce + ciphertext (with its 16-byte tag)."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, sealed: bytes, associated_data: bytes) -> bytes | None:
    """The plaintext, or None when `sealed` fails authentication under this key and data."""
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data)
    except InvalidTag:
        return None


def load_master_key(vault_dir: Path) -> bytes:
    """The master key from LORAPLEX_MASTER_KEY, else from vault_dir/master.key (made on first
    use, readable by its owner only)."""
    value = os.environ.get(MASTER_KEY_ENV)
    if value is not None:
        return _decode(value, MASTER_KEY_ENV)
    path = vault_dir / MASTER_KEY_FILE
    if not path.exists():
        _create_master_key(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        # Like ssh with a private key: a key others can read protects nothing, so say so.
        raise MasterKeyError(
            f"{path} can be read by other users (mode {mode:o}); run: chmod 600 {path}"
        )
    return _decode(path.read_text(), str(path))


def _create_master_key(path: Path) -> None:
    """Write a new key to a private temp file, then link it into place: os.link fails if the
    name exists, so when two processes start at once, one key wins and both use it, and no one
    ever reads a half-written file."""
    tmp = path.with_name(f".{MASTER_KEY_FILE}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with open(fd, "w") as writer:
            writer.write(base64.b64encode(new_key()).decode() + "\n")
            writer.flush()
            os.fsync(writer.fileno())
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process made the key first; use theirs
    finally:
        tmp.unlink()


def _decode(value: str, source: str) -> bytes:
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except binascii.Error:
        key = b""
    if len(key) != KEY_BYTES:
        raise MasterKeyError(
            f"{source} must hold a base64-encoded {KEY_BYTES}-byte key; make one with: "
            "python -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())'"
        )
    return key

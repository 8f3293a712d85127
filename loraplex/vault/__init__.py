"""The vault: tenants' training datasets, validated on upload and encrypted at rest.

Storage only (SQLite, files, AES-GCM): it never imports torch. Training (loraplex.train) reads
datasets through Vault.read, which decrypts in memory.
"""

from loraplex.vault.errors import (
    DatasetNotFound,
    IntegrityError,
    InvalidDataset,
    KeyShredded,
    MasterKeyError,
    VaultError,
)
from loraplex.vault.records import as_messages, parse_jsonl
from loraplex.vault.store import DatasetFile, DatasetVersion, Vault

__all__ = [
    "DatasetFile",
    "DatasetNotFound",
    "DatasetVersion",
    "IntegrityError",
    "InvalidDataset",
    "KeyShredded",
    "MasterKeyError",
    "Vault",
    "VaultError",
    "as_messages",
    "parse_jsonl",
]

"""Errors of the vault. Messages are shown to users as they are, so they name what is wrong."""


class VaultError(ValueError):
    """Base of every error the vault raises on purpose."""


class InvalidDataset(VaultError):
    """An upload that is not a valid dataset (bad JSON, missing fields, too large...)."""


class DatasetNotFound(VaultError):
    """A dataset or dataset version that does not exist (or is not this tenant's)."""


class MasterKeyError(VaultError):
    """A master key that is malformed, badly protected, or not the one this vault was made with."""


class IntegrityError(VaultError):
    """A stored dataset that fails to decrypt: tampered with, corrupted, or moved from elsewhere."""


class KeyShredded(VaultError):
    """A tenant's key that was destroyed (Vault.delete_tenant_vault): what it sealed is gone."""

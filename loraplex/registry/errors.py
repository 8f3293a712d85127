"""Errors of the registry. Messages are shown to users as they are, so they name what is wrong."""


class RegistryError(ValueError):
    """Base of every error the registry raises on purpose."""


class NotFound(RegistryError):
    """A tenant, key, adapter or version that does not exist (or is not the caller's)."""


class AlreadyExists(RegistryError):
    """A name that is already taken."""


class InvalidInput(RegistryError):
    """A malformed name, split, adapter directory, or an operation that cannot apply now."""

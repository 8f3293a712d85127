"""The registry of a loraplex home: tenants, keys, adapters, versions, deployments, audit.

Storage only (SQLite and files): it never imports torch, the engine or the server. The server
and the CLI use the Registry facade; the modules behind it are its implementation.
"""

from loraplex.registry.adapters import Version
from loraplex.registry.artifacts import ADAPTER_FILES, CONFIG_FILE, WEIGHTS_FILE
from loraplex.registry.audit import AuditEntry
from loraplex.registry.deployments import Deployment
from loraplex.registry.errors import AlreadyExists, InvalidInput, NotFound, RegistryError
from loraplex.registry.facade import AdapterInfo, Registry
from loraplex.registry.resolver import ResolvedVersion
from loraplex.registry.tenants import ADMIN, TENANT, KeyInfo, Principal, Tenant

__all__ = [
    "ADAPTER_FILES",
    "ADMIN",
    "CONFIG_FILE",
    "TENANT",
    "WEIGHTS_FILE",
    "AdapterInfo",
    "AlreadyExists",
    "AuditEntry",
    "Deployment",
    "InvalidInput",
    "KeyInfo",
    "NotFound",
    "Principal",
    "Registry",
    "RegistryError",
    "ResolvedVersion",
    "Tenant",
    "Version",
]

"""Where loraplex keeps its state: `$LORAPLEX_HOME`, else `~/.loraplex`."""

import os
from pathlib import Path

HOME_ENV = "LORAPLEX_HOME"
ADAPTER_CACHE_ENV = "LORAPLEX_ADAPTER_CACHE"  # where engines keep the serving cache; default below
ADAPTER_CACHE_DIR = "cache/adapters"  # under the loraplex home
# GGUF exports made for download (export/jobs.py), <home>/exports/<tenant>/: here, not in export/,
# so that the vault can delete a tenant's with the rest of its data.
EXPORTS_DIR = "exports"


def loraplex_home() -> Path:
    """The loraplex home directory (created on first use)."""
    home = Path(os.environ.get(HOME_ENV) or Path.home() / ".loraplex").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def adapter_cache_dir(home: Path | None = None) -> Path:
    """Where engines keep loaded adapters ready to serve (lora/packed.py). Here, not in lora/,
    so that the vault (which never imports torch) can delete a tenant's entries."""
    return Path(os.environ.get(ADAPTER_CACHE_ENV) or (home or loraplex_home()) / ADAPTER_CACHE_DIR)

"""Where loraplex keeps its state: `$LORAPLEX_HOME`, else `~/.loraplex`."""

import os
from pathlib import Path

HOME_ENV = "LORAPLEX_HOME"


def loraplex_home() -> Path:
    """The loraplex home directory (created on first use)."""
    home = Path(os.environ.get(HOME_ENV) or Path.home() / ".loraplex").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home

"""What every `loraplex` sub-command shares: one-line errors, the audit actor, the registry."""

import typer
from rich.console import Console

err = Console(stderr=True, highlight=False)


def fail(message: str) -> None:
    """Print one red line on stderr and exit 1: users see the message, never a traceback."""
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(1)


def actor() -> str:
    """Who the audit log says did it."""
    import getpass

    return f"cli:{getpass.getuser()}"


def open_registry():
    from loraplex.home import loraplex_home
    from loraplex.registry import Registry

    return Registry(loraplex_home())


def or_fail(function, *args, **kwargs):
    """Run a registry, vault or export operation; its errors (each a ValueError or OSError with
    a message written for users) become one line and exit status 1."""
    try:
        return function(*args, **kwargs)
    except (ValueError, OSError) as e:
        fail(str(e))


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds in "90s", "15m", "24h", "7d" or a bare number of seconds; ValueError otherwise."""
    value, unit = (text[:-1], text[-1]) if text[-1:] in _DURATION_UNITS else (text, "s")
    if not value.isdigit():
        raise ValueError(f"invalid duration {text!r}: use e.g. 90s, 15m, 24h or 7d")
    return int(value) * _DURATION_UNITS[unit]

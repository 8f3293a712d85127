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

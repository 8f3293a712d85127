"""What the benchmark scripts' tests share."""

import sys

import pytest


def usage_error(main, argv: list[str], monkeypatch, capsys) -> str:
    """Run a script's main with argv; it must stop with argparse's usage error (exit code 2,
    no traceback). Returns what it printed to stderr."""
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    return capsys.readouterr().err

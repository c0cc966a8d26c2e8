"""The console entry points' one shared step: a command whose packages are not installed says which extra brings
them, in one line, instead of a traceback (`pip install .` installs every command, not every command's packages)."""

from __future__ import annotations

import importlib
import sys


def run_command(command: str, extra: str, module: str) -> None:
    """Runs `module`'s main() as `command`; exits 2 naming facetwin[extra] when a package it imports is missing."""
    try:
        main = importlib.import_module(module).main
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("facetwin"):
            raise
        print(f"error: {command} needs {exc.name}: install facetwin[{extra}] (pip install 'facetwin[{extra}]')",
              file=sys.stderr)
        sys.exit(2)
    main()

"""The console entry points' one shared step: a command whose packages are not installed says which extra brings
them, in one line, instead of a traceback (`pip install .` installs every command, not every command's packages)."""

from __future__ import annotations

import importlib
import os
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


def facetwin() -> None:
    """Console entry point `facetwin` (facetwin.client.cli), named here because importing the client package imports
    gRPC: its C core logs some failures itself (a TLS handshake's, as an "I1206 ... ssl_transport_security.cc" line)
    besides the error it returns, and reads its log settings when it is imported. The command line says what went
    wrong in its own words, so those lines are off unless the caller set them."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    os.environ.setdefault("GRPC_TRACE", "")
    run_command("facetwin", "cli", "facetwin.client.cli")

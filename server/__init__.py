"""facetwin.server: the gRPC face-swap service."""

import sys
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("facetwin")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"


def main() -> None:
    """Console entry point `facetwin-server`: without the `server` extra it says what to install instead of a traceback."""
    try:
        from .cli import main as run
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("facetwin"):
            raise
        print(f"error: facetwin-server needs {exc.name}: install facetwin[server] (pip install 'facetwin[server]')",
              file=sys.stderr)
        sys.exit(2)
    run()

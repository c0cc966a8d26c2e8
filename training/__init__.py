"""facetwin.training: extract faces, train the autoencoder, export model bundles."""

import sys


def main() -> None:
    """Console entry point `facetwin-train`: without the `training` extra it says what to install, not a traceback."""
    try:
        from .cli import main as run
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("facetwin"):
            raise
        print(f"error: facetwin-train needs {exc.name}: install facetwin[training] (pip install 'facetwin[training]')",
              file=sys.stderr)
        sys.exit(2)
    run()

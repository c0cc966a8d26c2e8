"""facetwin.server: the gRPC face-swap service."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("facetwin")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"


def main() -> None:
    """Console entry point `facetwin-server`."""
    from facetwin.core.entry import run_command

    run_command("facetwin-server", "server", "facetwin.server.cli")

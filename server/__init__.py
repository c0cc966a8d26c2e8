"""facetwin.server: the gRPC face-swap service."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("facetwin")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

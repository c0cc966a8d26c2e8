"""Backends, chosen by name from one explicit registry (never discovered by scanning folders)."""

from __future__ import annotations

from .base import Backend
from .onnxruntime import OnnxRuntimeBackend

BACKENDS: dict[str, type[Backend]] = {
    OnnxRuntimeBackend.name: OnnxRuntimeBackend,
}


def get_backend(name: str) -> type[Backend]:
    """The backend class registered as `name`, checked to be usable on this host."""
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}") from None
    ok, why = cls.available()
    if not ok:
        raise ValueError(f"backend {name!r} is not available here: {why}")
    return cls


__all__ = ["BACKENDS", "Backend", "get_backend"]

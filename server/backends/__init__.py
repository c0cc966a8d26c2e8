"""Backends, chosen by name from one explicit registry (never discovered by scanning folders).

Importing this package imports no ML framework: every backend imports its runtime (onnxruntime, torch,
tensorrt + pycuda) only when it is constructed or asked whether it is available.
"""

from __future__ import annotations

import logging

from .base import Backend
from .onnxruntime import OnnxRuntimeBackend
from .tensorrt import TensorRTBackend
from .torch_backend import TorchCpuBackend, TorchCudaBackend

log = logging.getLogger(__name__)

BACKENDS: dict[str, type[Backend]] = {
    OnnxRuntimeBackend.name: OnnxRuntimeBackend,
    TorchCpuBackend.name: TorchCpuBackend,
    TorchCudaBackend.name: TorchCudaBackend,
    TensorRTBackend.name: TensorRTBackend,
}

AUTO = "auto"
# `--backend auto` tries these in order and takes the first available: fastest first, the CPU fallback last.
AUTO_ORDER: tuple[str, ...] = (TensorRTBackend.name, TorchCudaBackend.name, OnnxRuntimeBackend.name)


def select_backend(name: str) -> tuple[type[Backend], str]:
    """The backend class for `name` ("auto" or a BACKENDS key) and a sentence saying why it was chosen.

    Raises ValueError for an unknown name, or when the named backend (or, for auto, every candidate)
    cannot run on this host; the message carries each backend's reason.
    """
    if name == AUTO:
        skipped: list[str] = []
        for candidate in AUTO_ORDER:
            ok, why = BACKENDS[candidate].available()
            if ok:
                reason = f"auto selected {candidate!r}"
                if skipped:
                    reason += "; skipped " + "; ".join(skipped)
                log.info("%s", reason)
                return BACKENDS[candidate], reason
            skipped.append(f"{candidate}: {why}")
        raise ValueError("no backend is available for --backend auto: " + "; ".join(skipped))
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {[AUTO, *sorted(BACKENDS)]}") from None
    ok, why = cls.available()
    if not ok:
        raise ValueError(f"backend {name!r} is not available here: {why}")
    return cls, f"backend {name!r} requested"


def get_backend(name: str) -> type[Backend]:
    """The backend class registered as `name` (or picked by "auto"), checked to be usable on this host."""
    return select_backend(name)[0]


__all__ = ["AUTO", "AUTO_ORDER", "BACKENDS", "Backend", "get_backend", "select_backend"]

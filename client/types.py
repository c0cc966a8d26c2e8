"""Plain result types returned by the SDK, decoupled from the generated protobuf classes.

Callers get numpy arrays, tuples and strings, never protobuf messages, so code written against the
SDK keeps working when the wire format grows fields.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from facetwin.v1 import facetwin_pb2 as pb

__all__ = ["StageTimings", "DetectedFace", "SwapResult", "ModelInfo"]

_STATUS_NAMES = {
    pb.MODEL_STATUS_LOADING: "loading",
    pb.MODEL_STATUS_READY: "ready",
    pb.MODEL_STATUS_FAILED: "failed",
}


@dataclasses.dataclass(frozen=True)
class StageTimings:
    """Server-side time spent on one request, per stage, in milliseconds."""

    decode_ms: float  # decoding and validating the request image
    queue_ms: float  # waiting in the batcher for a batch to form
    inference_ms: float  # running the model on the whole batch this request was part of
    encode_ms: float  # encoding the response image
    total_ms: float  # request arrival to response ready
    batch_size: int  # images in the batch this request ran in (the largest, for several faces of a full frame)
    detect_ms: float = 0.0  # full frames: finding the faces and their landmarks
    align_ms: float = 0.0  # full frames: landmark smoothing and cutting out the aligned faces
    blend_ms: float = 0.0  # full frames: colour matching and pasting the swapped faces back

    @classmethod
    def from_proto(cls, message: pb.StageTimings) -> "StageTimings":
        return cls(
            decode_ms=float(message.decode_ms),
            queue_ms=float(message.queue_ms),
            inference_ms=float(message.inference_ms),
            encode_ms=float(message.encode_ms),
            total_ms=float(message.total_ms),
            batch_size=int(message.batch_size),
            detect_ms=float(message.detect_ms),
            align_ms=float(message.align_ms),
            blend_ms=float(message.blend_ms),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class DetectedFace:
    """A face the server found in a full frame (coordinates in the frame's pixels)."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the detector box; x1, y1 exclusive, may pass the edge
    landmarks: np.ndarray | None  # (68, 2) iBUG 300-W or (5, 2) dlib float32 points it was aligned on; None: boxes only
    score: float  # detector confidence (higher is surer)
    swapped: bool  # whether this face was swapped (see the faces selection of the request)

    @classmethod
    def from_proto(cls, message: pb.DetectedFace) -> "DetectedFace":
        b = message.box
        points = np.array([(p.x, p.y) for p in message.landmarks], np.float32).reshape(-1, 2)
        return cls(box=(int(b.x0), int(b.y0), int(b.x1), int(b.y1)), landmarks=points if len(points) else None,
                   score=float(message.score), swapped=bool(message.swapped))


# eq=False: the generated __eq__ would compare numpy arrays with ==, which raises on truth-testing;
# results compare by identity, and callers compare the arrays themselves.
@dataclasses.dataclass(frozen=True, eq=False)
class SwapResult:
    """One swapped image.

    With raw transport (the default) `image` is uint8 (H, W, 3) in the colour order the caller asked
    for and `mask` is uint8 (H, W). With png/jpeg transport the SDK does not decode (the base install
    has no image codecs): `image`/`mask` are None and the file bytes are in `encoded`/`encoded_mask`.
    A frame the server dropped from a stream has dropped=True and no image; one it could not swap (streams with
    frame_errors="yield") has `error` set and no image.
    """

    image: np.ndarray | None  # swapped face, raw transport only
    mask: np.ndarray | None  # face mask 0..255 (H, W), raw transport with return_mask only
    frame_id: int  # the request's frame id (0, 1, 2, ... in a stream)
    timings: StageTimings  # server-side per-stage timings
    dropped: bool = False  # the server skipped this stream frame because the stream fell behind
    encoded: bytes | None = None  # PNG/JPEG file bytes of the swapped face, encoded transport only
    encoded_mask: bytes | None = None  # PNG/JPEG file bytes of the mask, encoded transport with return_mask
    faces: tuple[DetectedFace, ...] = ()  # full frames: every face found, largest first; () for aligned faces
    error: Exception | None = None  # streams with frame_errors="yield": why this frame failed (a FaceTwinError)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """One model bundle loaded on the server."""

    name: str  # bundle name, the `model` argument of swap/stream
    identities: tuple[str, ...]  # valid `target` values
    resolution: int  # side of the square aligned face the model works at, pixels
    backend: str  # inference backend: onnxruntime, torch-cuda, tensorrt
    status: str  # "loading", "ready", "failed" ("unknown" if the server did not say)
    variant: str  # training variant: ae, vae, vae-gan, cyclegan
    manifest_sha256: str  # tells bundle versions apart
    error: str  # why loading failed, when status is "failed"; "" otherwise

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @classmethod
    def from_proto(cls, message: pb.ModelInfo) -> "ModelInfo":
        return cls(
            name=message.name,
            identities=tuple(message.identities),
            resolution=int(message.resolution),
            backend=message.backend,
            status=_STATUS_NAMES.get(message.status, "unknown"),
            variant=message.variant,
            manifest_sha256=message.manifest_sha256,
            error=message.error,
        )

"""Plain result types returned by the SDK, decoupled from the generated protobuf classes.

Callers get numpy arrays, tuples and strings, never protobuf messages, so code written against the
SDK keeps working when the wire format grows fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from facetwin.v1 import facetwin_pb2 as pb

__all__ = ["StageTimings", "DetectedFace", "SwapResult", "ModelInfo", "FileReport"]

_STATES = {pb.FACE_STATE_DETECTED: "detected", pb.FACE_STATE_TRACKED: "tracked", pb.FACE_STATE_LOST: "lost"}
_ACTIONS = {pb.FACE_ACTION_SWAPPED: "swapped", pb.FACE_ACTION_NOT_SWAPPED: "not_swapped",
            pb.FACE_ACTION_PASSED: "passed", pb.FACE_ACTION_HELD: "held", pb.FACE_ACTION_BLURRED: "blurred"}
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
    align_ms: float = 0.0  # full frames: cutting out the aligned faces
    blend_ms: float = 0.0  # full frames: colour matching and pasting the swapped faces back
    track_ms: float = 0.0  # stream full frames: following faces from the previous frame without detection
    embed_ms: float = 0.0  # full frames with reference rules: describing the frame's new faces

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
            track_ms=float(message.track_ms),
            embed_ms=float(message.embed_ms),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class DetectedFace:
    """A face of a full frame (coordinates in the frame's pixels)."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the detector box; x1, y1 exclusive, may pass the edge
    landmarks: np.ndarray | None  # (68, 2) iBUG 300-W or (5, 2) dlib float32 points it was aligned on; None: boxes only
    score: float  # confidence of the detection that found it (higher is surer)
    swapped: bool  # whether a swap of this face is in the frame (action "swapped" or "held")
    track_id: int = 0  # the same in every frame of a stream while the face is followed; unary: 1 = largest
    state: str = "detected"  # "detected", "tracked" (followed without detection) or "lost" (where last seen)
    action: str = "not_swapped"  # "swapped", "not_swapped", or for lost faces "passed", "held", "blurred"
    target: str | None = None  # the identity it was swapped to (swapped, held)
    reference_distance: float | None = None  # face-descriptor distance to the nearest reference photo, if compared
    note: str = ""  # why it was or was not swapped

    @classmethod
    def from_proto(cls, message: pb.DetectedFace) -> "DetectedFace":
        b = message.box
        points = np.array([(p.x, p.y) for p in message.landmarks], np.float32).reshape(-1, 2)
        distance = float(message.reference_distance) if message.HasField("reference_distance") else None
        return cls(box=(int(b.x0), int(b.y0), int(b.x1), int(b.y1)), landmarks=points if len(points) else None,
                   score=float(message.score), swapped=bool(message.swapped), track_id=int(message.track_id),
                   state=_STATES.get(message.state, "detected"), action=_ACTIONS.get(message.action, "not_swapped"),
                   target=message.target or None, reference_distance=distance, note=message.note)


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where a swapped image came from: always synthetic, and the exact weights that made it."""

    synthetic: bool  # always True: a trained model made the image
    digital_source_type: str  # the IPTC URI (trainedAlgorithmicMedia); PNG/JPEG outputs carry it as XMP too
    model: str  # the model bundle that made it
    target: str  # the identity it rendered
    manifest_sha256: str  # sha256 of the bundle's manifest, which lists the sha256 of every weight file

    @classmethod
    def from_proto(cls, message: pb.Provenance) -> "Provenance | None":
        if not message.synthetic:
            return None  # not set (a dropped frame of a model the server does not know)
        return cls(synthetic=True, digital_source_type=message.digital_source_type, model=message.model,
                   target=message.target, manifest_sha256=message.manifest_sha256)


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
    faces: tuple[DetectedFace, ...] = ()  # full frames: faces found largest first, then lost ones; () for crops
    error: Exception | None = None  # streams with frame_errors="yield": why this frame failed (a FaceTwinError)
    provenance: Provenance | None = None  # the model and weights that made the image (None where none did)
    request_id: str = ""  # the call's request id: the server's log lines about it carry the same one
    # Whole frames sent as arrays: the box (x0, y0, x1, y1) that holds every pixel the swap changed (the rest of `image`
    # is the frame as sent); None when nothing changed, or for other requests.
    region: tuple[int, int, int, int] | None = None
    # A whole frame over the server's limits is sent scaled down by this factor and its swap blended back into the
    # frame at full resolution (see facetwin.client.scaling); 1 when it was sent as it is.
    sent_scale: int = 1
    scale_note: str = ""  # why it was sent scaled, e.g. "sent at 1/2 scale: larger than the server's 16 MiB messages"


def face_counts(result: SwapResult, aligned: bool) -> tuple[int, int, int]:
    """(1 if the frame had a face else 0, faces swapped, faces reported) for a file's report. An aligned crop is one
    face, swapped whenever the server answered it; a whole frame counts the faces the server listed."""
    if aligned:
        answered = int(not result.dropped and result.error is None)
        return answered, answered, answered
    return int(bool(result.faces)), sum(face.swapped for face in result.faces), len(result.faces)


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


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """How the server is configured (GetServerInfo): what a caller needs before sending work."""

    version: str  # the server's facetwin version
    auth_required: bool  # calls need a bearer token
    tls: bool
    client_certificate_required: bool  # mutual TLS
    # Every limit in force, by ServerLimits' field names (max_streams_per_client, max_image_side, ...; 0 = none where
    # the proto says so); what each one answers past it is in the proto's comments.
    limits: dict[str, object]
    # What a stream gets when it does not say: its policy ("queue" / "latest"), what happens to a face it loses
    # ("pass" / "hold" / "blur") and for how many frames, and the reference distance a FaceRule matches within.
    default_stream_policy: str = ""
    default_lost_faces: str = ""
    default_lost_face_frames: int = 0
    default_match_threshold: float = 0.0
    detect_every: int = 0  # a stream's full frames are searched for faces every this many frames, followed between
    processes: int = 1  # serving processes behind the address, each applying `limits` to the calls it serves
    default_keep_shape: float = 0.0  # full frames: keep_shape when a request leaves it unset

    @classmethod
    def from_proto(cls, message: pb.GetServerInfoResponse) -> "ServerInfo":
        limits = {field.name: value if isinstance(value, (bool, int, float, str)) else list(value)  # repeated
                  for field in message.limits.DESCRIPTOR.fields
                  for value in [getattr(message.limits, field.name)]}
        return cls(version=message.version, auth_required=message.auth_required, tls=message.tls,
                   client_certificate_required=message.client_certificate_required, limits=limits,
                   default_stream_policy=_enum_word(pb.StreamPolicy, message.default_stream_policy),
                   default_lost_faces=_enum_word(pb.LostFacePolicy, message.default_lost_faces),
                   default_lost_face_frames=message.default_lost_face_frames,
                   default_match_threshold=message.default_match_threshold,
                   detect_every=message.detect_every, processes=message.processes,
                   default_keep_shape=message.default_keep_shape)


def _enum_word(enum: Any, value: int) -> str:
    """An enum value as the SDK's word for it: STREAM_POLICY_LATEST -> "latest" ("" when unset or unknown)."""
    try:
        name = enum.Name(value)
    except ValueError:
        return ""
    return "" if name.endswith("_UNSPECIFIED") else name.rsplit("_", 1)[-1].lower()


@dataclasses.dataclass(frozen=True)
class FileReport:
    """What swapping one photo or video file did (swap_image_file, swap_video_file)."""

    input: str  # the file read
    output: str  # the file written
    kind: str  # "image" or "video"
    frames: int  # frames written (1 for a photo)
    frames_with_faces: int  # frames in which the server found at least one face
    faces_swapped: int  # faces swapped, summed over the frames
    max_faces: int  # most faces found in one frame
    seconds: float  # wall time, reading to renaming the output into place
    dropped: int = 0  # stream frames the server skipped (written unchanged)
    audio_streams: int = 0  # audio streams copied unchanged into the output
    sent_scale: int = 1  # frames were sent scaled down by this factor to fit the server's limits (1: as they are)
    scale_note: str = ""  # why, e.g. "sent at 1/2 scale: larger than the server's 16 MiB messages"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

"""numpy <-> facetwin.v1 messages: request building, response parsing and stream bookkeeping, shared by
Client and AsyncClient so the two differ only in how they wait.

Only numpy and the generated protobuf code: the base install has no image codecs, so encoded (PNG/JPEG)
images travel as opaque bytes and are never decoded here. Caller mistakes found before sending raise
InvalidInputError (a ValueError) with a message that says what to pass instead.
"""

from __future__ import annotations

import collections
from typing import Any, Literal, Union

import grpc
import numpy as np

from facetwin.v1 import facetwin_pb2 as pb
from facetwin.v1 import trailers

from .errors import InvalidInputError, ResourceExhaustedError, ServerError, error_for_code, trailing_metadata
from .mapping import FaceMapping, LostFaces, fill_mapping, lost_faces_enum
from .scaling import FrameLimits, ScaledFrame, plan_frame
from .types import DetectedFace, Provenance, StageTimings, SwapResult

__all__ = [
    "ColorName",
    "EncodingName",
    "ImageInput",
    "sniff_format",
    "fill_raw",
    "array_to_raw",
    "fill_image",
    "image_to_proto",
    "raw_to_array",
    "check_swap_args",
    "build_swap_request",
    "asks_region",
    "result_from_response",
    "check_request_size",
    "may_scale",
    "request_headroom",
    "plan_scaled",
    "finish_scaled",
    "StreamState",
]

ColorName = Literal["rgb", "bgr"]
PolicyName = Literal["queue", "latest"]
# Which faces of a full frame to swap: None = the image is an aligned face crop (no detection);
# "largest" / "all" / an int (the n-th face, largest first) = a whole frame the server detects faces in;
# a FaceMapping = a whole frame, faces picked rule by rule (by place, track id or reference photos of a person).
FacesArg = Union[None, Literal["largest", "all"], int, FaceMapping]
_POLICIES = {"queue": pb.STREAM_POLICY_QUEUE, "latest": pb.STREAM_POLICY_LATEST}
EncodingName = Literal["raw", "png", "jpeg"]
# An image argument: a uint8 (H, W, 3) array, or the bytes of a PNG/JPEG file.
ImageInput = Union[np.ndarray, bytes, bytearray, memoryview]

_COLOR_ORDERS = {"rgb": pb.COLOR_ORDER_RGB, "bgr": pb.COLOR_ORDER_BGR}
_ENCODINGS = {"raw": pb.ENCODING_RAW, "png": pb.ENCODING_PNG, "jpeg": pb.ENCODING_JPEG}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_HEADROOM_BYTES = 64 * 1024  # far above a request's fields besides the pixels (names, enums, ids)


def _invalid(message: str) -> InvalidInputError:
    return InvalidInputError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _color_enum(color: str) -> int:
    try:
        return _COLOR_ORDERS[color]
    except (KeyError, TypeError):
        raise _invalid(f"color must be 'rgb' or 'bgr' (the channel order of your arrays), got {color!r}") from None


def _encoding_enum(encoding: str) -> int:
    try:
        return _ENCODINGS[encoding]
    except (KeyError, TypeError):
        raise _invalid(f"encoding must be 'raw', 'png' or 'jpeg', got {encoding!r}") from None


def sniff_format(data: bytes | bytearray | memoryview) -> str | None:
    """'png' or 'jpeg' from a file's magic bytes; None when it is neither."""
    head = bytes(data[:8])
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    return None


def fill_raw(message: pb.RawImage, array: np.ndarray, *, color: ColorName) -> pb.RawImage:
    """Writes a uint8 (H, W, 3) array in `color` order into `message`; any memory layout, one HWC copy.

    Filling a message in place matters for big frames: protobuf constructors copy nested messages,
    which costs a full copy of the pixels per level of nesting.
    """
    order = _color_enum(color)
    if not isinstance(array, np.ndarray):
        raise _invalid(f"expected a numpy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        hint = " (scale floats in 0..1 with (a * 255).round().astype(np.uint8))" if array.dtype.kind == "f" else ""
        raise _invalid(f"image dtype is {array.dtype}; send uint8 pixels 0..255{hint}")
    if array.ndim != 3 or array.shape[2] != 3:
        raise _invalid(
            f"image shape is {array.shape}; send an (H, W, 3) colour array "
            "(add channels with np.repeat for grayscale, drop alpha with a[..., :3])"
        )
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise _invalid(f"image shape is {array.shape}; it has no pixels")
    message.pixels = np.ascontiguousarray(array).tobytes()
    message.height, message.width, message.channels = height, width, 3
    message.color_order = order
    message.pixel_type = pb.PIXEL_TYPE_UINT8
    return message


def array_to_raw(array: np.ndarray, *, color: ColorName) -> pb.RawImage:
    """A uint8 (H, W, 3) array in `color` order -> a new RawImage."""
    return fill_raw(pb.RawImage(), array, color=color)


def fill_image(message: pb.Image, image: ImageInput, *, color: ColorName) -> pb.Image:
    """An array -> message.raw; PNG/JPEG file bytes -> message.encoded (sent as is, never decoded here)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise _invalid("image bytes are empty: pass the contents of a PNG or JPEG file")
        if sniff_format(data) is None:
            raise _invalid(
                f"image bytes ({len(data)} bytes, starting {data[:8].hex()}) are not a PNG or JPEG file; "
                "pass the file's bytes, or a numpy uint8 (H, W, 3) array"
            )
        message.encoded = data
    elif isinstance(image, np.ndarray):
        fill_raw(message.raw, image, color=color)
    else:
        raise _invalid(
            f"image must be a numpy uint8 (H, W, 3) array or PNG/JPEG file bytes, got {type(image).__name__}"
        )
    return message


def image_to_proto(image: ImageInput, *, color: ColorName) -> pb.Image:
    """An array or PNG/JPEG file bytes -> a new Image."""
    return fill_image(pb.Image(), image, color=color)


def raw_to_array(raw: pb.RawImage, *, color: ColorName | None = None) -> np.ndarray:
    """RawImage -> writable uint8 array: (H, W, 3) for colour, (H, W) for masks (channels = 1).

    Colour images come back in `color` order: the channels are reversed when the message states the
    other order (an unspecified order is taken to be the one asked for). Raises ValueError when the
    message is inconsistent.
    """
    if raw.pixel_type not in (pb.PIXEL_TYPE_UNSPECIFIED, pb.PIXEL_TYPE_UINT8):
        raise ValueError(f"raw image has pixel type {pb.PixelType.Name(raw.pixel_type)}; only uint8 is supported")
    if raw.channels not in (1, 3):
        raise ValueError(f"raw image has {raw.channels} channels; expected 3 (colour) or 1 (mask)")
    expected = raw.height * raw.width * raw.channels
    if len(raw.pixels) != expected or expected == 0:
        raise ValueError(
            f"raw image holds {len(raw.pixels)} bytes but height*width*channels = "
            f"{raw.height}*{raw.width}*{raw.channels} = {expected}"
        )
    # np.frombuffer over bytes is read-only; every path below copies once, so callers get a writable
    # array (e.g. for cv2 drawing).
    view = np.frombuffer(raw.pixels, dtype=np.uint8)
    if raw.channels == 1:
        return view.reshape(raw.height, raw.width).copy()
    view = view.reshape(raw.height, raw.width, 3)
    if color is not None and raw.color_order not in (pb.COLOR_ORDER_UNSPECIFIED, _color_enum(color)):
        return np.ascontiguousarray(view[:, :, ::-1])
    return view.copy()


def check_swap_args(model: str, target: str, *, color: ColorName, encoding: EncodingName = "raw") -> None:
    """Validates the per-call arguments, so a stream fails on the call rather than on its first frame."""
    for name, value in (("model", model), ("target", target)):
        if not isinstance(value, str) or not value:
            raise _invalid(f"{name} must be a non-empty string (see Client.list_models), got {value!r}")
    _color_enum(color)
    _encoding_enum(encoding)


def build_swap_request(
    image: ImageInput,
    model: str,
    target: str,
    *,
    color: ColorName,
    return_mask: bool = False,
    encoding: EncodingName = "raw",
    frame_id: int = 0,
    jpeg_quality: int | None = None,
    faces: FacesArg = None,
    keep_shape: float | None = None,
    into: pb.SwapRequest | None = None,
) -> pb.SwapRequest:
    """Validates the arguments and builds one SwapRequest (raw results come back in `color` order).

    into: an empty SwapRequest to fill in place (e.g. SwapStreamRequest().request), saving a pixel copy.
    """
    check_swap_args(model, target, color=color, encoding=encoding)
    if isinstance(frame_id, bool) or not isinstance(frame_id, (int, np.integer)) or not 0 <= frame_id < 2**64:
        raise _invalid(f"frame_id must be an integer in 0..2**64-1, got {frame_id!r}")
    if jpeg_quality is not None and (isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, int)
                                     or not 1 <= jpeg_quality <= 100):
        raise _invalid(f"jpeg_quality must be an integer in 1..100 (None = server default 90), got {jpeg_quality!r}")
    request = pb.SwapRequest() if into is None else into
    fill_image(request.image, image, color=color)
    request.model, request.target = model, target
    _fill_faces(request, faces, keep_shape, color=color)
    request.output_encoding = _encoding_enum(encoding)
    request.output_color_order = _color_enum(color)
    request.jpeg_quality = jpeg_quality or 0
    request.return_mask = bool(return_mask)
    request.frame_id = int(frame_id)
    request.return_region = asks_region(request)
    return request


def asks_region(request: pb.SwapRequest) -> bool:
    """Whether a request should ask for the changed region only: a whole frame sent and answered raw. The SDK holds
    the frame it sent, so result_from_response rebuilds the whole answer from it, pixel for pixel, and the answer
    carries the faces' area instead of the frame (a 1080p frame: 6 MB less to receive and parse)."""
    return (request.kind == pb.IMAGE_KIND_FULL_FRAME and request.image.WhichOneof("data") == "raw"
            and request.output_encoding == pb.ENCODING_RAW)


def _fill_faces(request: pb.SwapRequest, faces: FacesArg, keep_shape: float | None = None, *, color: ColorName,
                with_mapping: bool = True) -> None:
    """with_mapping: False for a stream's later frames, which the first frame's mapping covers."""
    if keep_shape is not None:
        if faces is None:
            raise _invalid("keep_shape applies to whole frames only: pass faces='largest', 'all' or an index too")
        if isinstance(keep_shape, bool) or not isinstance(keep_shape, (int, float, np.floating)) \
                or not 0.0 <= keep_shape <= 1.0:
            raise _invalid(f"keep_shape must be a number in 0..1 (0 = the target's face shape, 1 = the original "
                           f"face's; None = the server's default), got {keep_shape!r}")
        request.keep_shape = float(keep_shape)
    if faces is None:
        request.kind = pb.IMAGE_KIND_ALIGNED_FACE
        return
    request.kind = pb.IMAGE_KIND_FULL_FRAME
    if isinstance(faces, FaceMapping):
        if with_mapping:
            fill_mapping(request.mapping, faces, color=color)
    elif faces == "largest":
        request.faces = pb.FACE_SELECTION_LARGEST
    elif faces == "all":
        request.faces = pb.FACE_SELECTION_ALL
    elif isinstance(faces, (int, np.integer)) and not isinstance(faces, bool) and 0 <= faces < 2**32:
        request.faces, request.face_index = pb.FACE_SELECTION_INDEX, int(faces)
    else:
        raise _invalid(f"faces must be None (aligned crop), 'largest', 'all', a face index >= 0 or a FaceMapping, "
                       f"got {faces!r}")


def _split_image(image: pb.Image, color: ColorName) -> tuple[np.ndarray | None, bytes | None]:
    kind = image.WhichOneof("data")
    if kind == "raw":
        return raw_to_array(image.raw, color=color), None
    if kind == "encoded":
        return None, image.encoded
    return None, None


def result_from_response(response: pb.SwapResponse, *, color: ColorName, dropped: bool = False,
                         sent: pb.SwapRequest | None = None) -> SwapResult:
    """SwapResponse -> SwapResult; a malformed response raises ServerError (the server broke the contract).
    sent: the request, which a region answer (return_region) is pasted over to give the whole frame."""
    region = None
    try:
        image, encoded = _split_image(response.image, color)
        mask, encoded_mask = _split_image(response.mask, color)
        if sent is not None and sent.return_region and not dropped:
            image, mask, region = _whole_frame(response, sent, image, mask, color)
    except ValueError as exc:
        message = f"malformed response for frame {response.frame_id}: {exc}"
        raise ServerError(grpc.StatusCode.INTERNAL, message) from None
    if not dropped and image is None and encoded is None:
        raise ServerError(grpc.StatusCode.INTERNAL, f"response for frame {response.frame_id} carries no image")
    if image is not None and image.ndim != 3:
        raise ServerError(grpc.StatusCode.INTERNAL, f"response image for frame {response.frame_id} is not colour")
    return SwapResult(
        image=image,
        mask=mask,
        frame_id=int(response.frame_id),
        timings=StageTimings.from_proto(response.timings),
        dropped=dropped,
        encoded=encoded,
        encoded_mask=encoded_mask,
        faces=tuple(DetectedFace.from_proto(face) for face in response.faces),
        provenance=Provenance.from_proto(response.provenance),
        request_id=response.request_id,
        region=region,
    )


def _whole_frame(response: pb.SwapResponse, sent: pb.SwapRequest, image: np.ndarray | None, mask: np.ndarray | None,
                 color: ColorName) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int, int, int] | None]:
    """A region answer pasted over the frame that was sent: the whole swapped frame, its mask and the region."""
    box = response.region
    x0, y0, x1, y1 = box.x0, box.y0, box.x1, box.y1
    if (x0, y0, x1, y1) == (0, 0, 0, 0):
        if image is not None:  # a server that does not know return_region answered the whole frame
            return image, mask, None
        image, region = raw_to_array(sent.image.raw, color=color), None  # nothing changed
    else:
        frame = raw_to_array(sent.image.raw, color=color)
        height, width = frame.shape[:2]
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"region ({x0}, {y0}, {x1}, {y1}) is not inside the {width}x{height} frame")
        if image is None or image.shape[:2] != (y1 - y0, x1 - x0):
            shape = "none" if image is None else f"{image.shape[1]}x{image.shape[0]}"
            raise ValueError(f"the region is {x1 - x0}x{y1 - y0} but its image is {shape}")
        frame[y0:y1, x0:x1] = image
        image, region = frame, (x0, y0, x1, y1)
    if not sent.return_mask:
        return image, mask, region
    whole = np.zeros(image.shape[:2], np.uint8)
    if region is not None:
        if mask is None or mask.shape != (y1 - y0, x1 - x0):
            raise ValueError("the region's mask is missing or not the region's size")
        whole[y0:y1, x0:x1] = mask
    return image, whole, region


def may_scale(image: ImageInput, faces: FacesArg, encoding: EncodingName = "raw") -> bool:
    """Whether a request could be sent scaled to fit the server's limits: a whole frame given as an array and
    answered raw (the SDK blends the answer into the caller's frame; it cannot for encoded images)."""
    return faces is not None and isinstance(image, np.ndarray) and encoding == "raw"


def request_headroom(faces: FacesArg, *, color: ColorName) -> int:
    """Bytes a whole frame's request holds besides its pixels, at most: a face mapping's reference photos count."""
    if isinstance(faces, FaceMapping):
        mapping = pb.FaceMapping()
        fill_mapping(mapping, faces, color=color)
        return _HEADROOM_BYTES + mapping.ByteSize()
    return _HEADROOM_BYTES


def plan_scaled(image: ImageInput, faces: FacesArg, limits: FrameLimits | None, *,
                color: ColorName) -> ScaledFrame | None:
    """The frame to send scaled down (see facetwin.client.scaling), or None to send `image` as it is."""
    if limits is None or faces is None:
        return None
    return plan_frame(image, limits, request_headroom(faces, color=color))


def finish_scaled(scaled: ScaledFrame | None, result: SwapResult, want_mask: bool) -> SwapResult:
    """The result for the caller's own frame when it was sent scaled; a malformed answer raises ServerError."""
    if scaled is None:
        return result
    try:
        return scaled.finish(result, want_mask)
    except ValueError as exc:
        raise ServerError(grpc.StatusCode.INTERNAL, f"malformed response for frame {result.frame_id}: {exc}") from None




class StreamState:
    """Per-stream bookkeeping shared by the sync and async streams.

    Assigns frame ids 0, 1, 2, ..., checks that results come back in request order (the service's
    contract), and keeps the request side's exception so it reaches the caller instead of gRPC's
    generic "Exception iterating requests".
    """

    def __init__(self, model: str, target: str, *, color: ColorName, return_mask: bool, max_bytes: int,
                 policy: PolicyName = "queue", faces: FacesArg = None, keep_shape: float | None = None,
                 frame_errors: str = "raise", lost_faces: LostFaces | None = None,
                 lost_face_frames: int | None = None) -> None:
        check_swap_args(model, target, color=color)
        if policy not in _POLICIES:
            raise _invalid(f"policy must be one of {sorted(_POLICIES)}, got {policy!r}")
        self.policy = _POLICIES[policy]
        if frame_errors not in ("raise", "yield"):
            raise _invalid(f"frame_errors must be 'raise' or 'yield', got {frame_errors!r}")
        self.raise_frame_errors = frame_errors == "raise"
        self.model, self.target, self.color, self.return_mask = model, target, color, return_mask
        self.faces, self.keep_shape = faces, keep_shape
        self.lost_faces = lost_faces_enum(lost_faces)
        if lost_face_frames is not None and (isinstance(lost_face_frames, bool) or not isinstance(lost_face_frames, int)
                                             or not 1 <= lost_face_frames <= 300):
            raise _invalid(f"lost_face_frames must be an integer in 1..300 or None (the server's default), "
                           f"got {lost_face_frames!r}")
        self.lost_face_frames = lost_face_frames or 0
        self._first = pb.SwapRequest()  # the faces fields of the stream's first message, mapping included
        _fill_faces(self._first, faces, keep_shape, color=color)  # validates now, before the stream starts
        self.max_bytes = max_bytes
        self.limits: FrameLimits | None = None  # the server's, once known: whole frames over them are sent scaled
        self._scaled: dict[int, ScaledFrame] = {}  # frame id -> a frame sent scaled and not yet answered
        self._headroom = request_headroom(faces, color=color)
        self.sent = 0  # frames handed to gRPC; also the next frame id
        self.received = 0  # results yielded
        self.unanswered: collections.deque[pb.SwapStreamRequest] = collections.deque()  # sent, no answer yet
        self.error: BaseException | None = None  # raised by the caller's frames or by request building

    def make_request(self, frame: Any) -> pb.SwapStreamRequest:
        """The next frame's message. A frame this side refuses (its shape, dtype or size) ends the stream with that
        error, naming the frame: it is the caller's own, and frames after it would most likely share it."""
        message = pb.SwapStreamRequest()
        faces = self.faces if not isinstance(self.faces, FaceMapping) else None
        scaled = None
        if self.faces is not None and self.limits is not None:
            scaled = plan_frame(frame, self.limits, self._headroom)
        try:
            build_swap_request(frame if scaled is None else scaled.small, self.model, self.target, color=self.color,
                               return_mask=self.return_mask or scaled is not None, frame_id=self.sent, faces=faces,
                               keep_shape=self.keep_shape, into=message.request)
            if isinstance(self.faces, FaceMapping):  # a whole frame; the mapping travels in the first message only
                message.request.kind = pb.IMAGE_KIND_FULL_FRAME
                message.request.return_region = asks_region(message.request)
            if self.sent == 0:
                self._open(message)
            check_request_size(message.request, self.max_bytes)
        except (InvalidInputError, ResourceExhaustedError) as exc:
            raise type(exc)(exc.code, f"frame {self.sent}: {exc.details}") from None
        if scaled is not None:
            self._scaled[self.sent] = scaled
        self.sent += 1
        self.unanswered.append(message)
        return message

    def resend(self) -> list[pb.SwapStreamRequest]:
        """The frames to send first on a new call: those sent on an earlier call and not answered, the first one
        carrying the stream's policy (the server reads it from a stream's first message)."""
        resend = list(self.unanswered)
        if resend and resend[0].request.frame_id != 0:  # a new call is a new stream: its first message opens it
            first = pb.SwapStreamRequest()
            first.CopyFrom(resend[0])
            self._open(first)
            resend[0] = first
        return resend

    def _open(self, message: pb.SwapStreamRequest) -> None:
        """Makes `message` a stream's first: the stream's policies and its face mapping."""
        message.policy = self.policy
        message.lost_faces, message.lost_face_frames = self.lost_faces, self.lost_face_frames
        if self._first.HasField("mapping"):
            message.request.mapping.CopyFrom(self._first.mapping)

    def can_resume(self, err: grpc.RpcError, resumes: int, limit: int, *, status_lost: bool = False,
                   taken: bool = False) -> bool:
        """Whether a stream that failed with err may go on over a new call: its server went away (UNAVAILABLE --
        draining, restarted, connection lost) after it took the stream -- it answered a frame, or said so (its
        drain asks for a reconnect; `taken`: the caller learnt it otherwise) -- the request side is fine, and
        resumes are left. A stream never taken was most likely never reached: a wrong address fails at once.
        status_lost: gRPC replaced the server's status (grpc.aio, when the server ended the call while frames were
        being written); a server ends a stream it took that way when it drains, so it is taken for that."""
        code = err.code() if callable(getattr(err, "code", None)) else None
        taken = taken or self.received > 0 or _asks_reconnect(err)
        return ((code == grpc.StatusCode.UNAVAILABLE or status_lost) and taken and self.error is None
                and resumes < limit)

    def on_response(self, message: pb.SwapStreamResponse) -> SwapResult:
        response = message.response
        if response.frame_id != self.received:
            raise ServerError(
                grpc.StatusCode.INTERNAL,
                f"stream result out of order: got frame {response.frame_id}, expected {self.received}",
            )
        self.received += 1
        sent = None
        if self.unanswered and self.unanswered[0].request.frame_id == response.frame_id:
            sent = self.unanswered.popleft().request
        scaled = self._scaled.pop(response.frame_id, None)
        if message.status == pb.FRAME_STATUS_DROPPED:
            timings = StageTimings.from_proto(response.timings)
            return SwapResult(image=None, mask=None, frame_id=response.frame_id, timings=timings, dropped=True)
        if message.status == pb.FRAME_STATUS_ERROR:
            error = error_for_code(_status_code(message.error.code), message.error.message)
            if self.raise_frame_errors:  # the loop ends here: say which frame (a yielded result carries its frame_id)
                raise error_for_code(_status_code(message.error.code),
                                     f"frame {response.frame_id}: {message.error.message}")
            timings = StageTimings.from_proto(response.timings)
            return SwapResult(image=None, mask=None, frame_id=response.frame_id, timings=timings, error=error)
        if message.status != pb.FRAME_STATUS_OK:
            raise ServerError(grpc.StatusCode.INTERNAL, f"frame {response.frame_id} has status {message.status}")
        result = result_from_response(response, color=self.color, sent=sent)
        return finish_scaled(scaled, result, self.return_mask)

    def finish(self) -> None:
        """Called when the server closed the stream cleanly: re-raises the request side's error, checks counts."""
        if self.error is not None:
            raise self.error
        if self.received != self.sent:
            raise ServerError(
                grpc.StatusCode.INTERNAL, f"stream ended after {self.received} results for {self.sent} frames"
            )


def _asks_reconnect(err: grpc.RpcError) -> bool:
    """Whether the server ended the call saying so in its trailing metadata (it took the stream and drains)."""
    return trailers.RECONNECT in trailing_metadata(err)


def _status_code(number: int) -> grpc.StatusCode:
    return next((code for code in grpc.StatusCode if code.value[0] == number), grpc.StatusCode.UNKNOWN)


def check_request_size(request: pb.SwapRequest, max_bytes: int) -> None:
    """Rejects a request over the client's message limit with advice, before gRPC rejects it opaquely."""
    image = request.image
    payload = len(image.raw.pixels) if image.WhichOneof("data") == "raw" else len(image.encoded)
    if payload + _HEADROOM_BYTES < max_bytes:
        return  # ByteSize walks the whole message (~0.7 ms for a 1080p frame); skip it when clearly under
    size = request.ByteSize()
    if size > max_bytes:
        raise ResourceExhaustedError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"request is {size / 2**20:.1f} MiB, over this client's max_message_mb={max_bytes / 2**20:g}; "
            "send a PNG/JPEG file's bytes, downscale, or raise max_message_mb (and the server's limit)",
        )

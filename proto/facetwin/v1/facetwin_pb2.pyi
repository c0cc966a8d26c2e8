from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ColorOrder(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COLOR_ORDER_UNSPECIFIED: _ClassVar[ColorOrder]
    COLOR_ORDER_RGB: _ClassVar[ColorOrder]
    COLOR_ORDER_BGR: _ClassVar[ColorOrder]

class PixelType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PIXEL_TYPE_UNSPECIFIED: _ClassVar[PixelType]
    PIXEL_TYPE_UINT8: _ClassVar[PixelType]
    PIXEL_TYPE_FLOAT32: _ClassVar[PixelType]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_RAW: _ClassVar[Encoding]
    ENCODING_PNG: _ClassVar[Encoding]
    ENCODING_JPEG: _ClassVar[Encoding]

class ImageKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_KIND_UNSPECIFIED: _ClassVar[ImageKind]
    IMAGE_KIND_ALIGNED_FACE: _ClassVar[ImageKind]
    IMAGE_KIND_FULL_FRAME: _ClassVar[ImageKind]

class FaceSelection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FACE_SELECTION_UNSPECIFIED: _ClassVar[FaceSelection]
    FACE_SELECTION_ALL: _ClassVar[FaceSelection]
    FACE_SELECTION_LARGEST: _ClassVar[FaceSelection]
    FACE_SELECTION_INDEX: _ClassVar[FaceSelection]

class LostFacePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOST_FACE_POLICY_UNSPECIFIED: _ClassVar[LostFacePolicy]
    LOST_FACE_POLICY_PASS: _ClassVar[LostFacePolicy]
    LOST_FACE_POLICY_HOLD: _ClassVar[LostFacePolicy]
    LOST_FACE_POLICY_BLUR: _ClassVar[LostFacePolicy]

class FaceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FACE_STATE_UNSPECIFIED: _ClassVar[FaceState]
    FACE_STATE_DETECTED: _ClassVar[FaceState]
    FACE_STATE_TRACKED: _ClassVar[FaceState]
    FACE_STATE_LOST: _ClassVar[FaceState]

class FaceAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FACE_ACTION_UNSPECIFIED: _ClassVar[FaceAction]
    FACE_ACTION_SWAPPED: _ClassVar[FaceAction]
    FACE_ACTION_NOT_SWAPPED: _ClassVar[FaceAction]
    FACE_ACTION_PASSED: _ClassVar[FaceAction]
    FACE_ACTION_HELD: _ClassVar[FaceAction]
    FACE_ACTION_BLURRED: _ClassVar[FaceAction]

class FrameStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FRAME_STATUS_UNSPECIFIED: _ClassVar[FrameStatus]
    FRAME_STATUS_OK: _ClassVar[FrameStatus]
    FRAME_STATUS_DROPPED: _ClassVar[FrameStatus]
    FRAME_STATUS_ERROR: _ClassVar[FrameStatus]

class StreamPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STREAM_POLICY_UNSPECIFIED: _ClassVar[StreamPolicy]
    STREAM_POLICY_QUEUE: _ClassVar[StreamPolicy]
    STREAM_POLICY_LATEST: _ClassVar[StreamPolicy]

class ModelStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATUS_UNSPECIFIED: _ClassVar[ModelStatus]
    MODEL_STATUS_LOADING: _ClassVar[ModelStatus]
    MODEL_STATUS_READY: _ClassVar[ModelStatus]
    MODEL_STATUS_FAILED: _ClassVar[ModelStatus]
COLOR_ORDER_UNSPECIFIED: ColorOrder
COLOR_ORDER_RGB: ColorOrder
COLOR_ORDER_BGR: ColorOrder
PIXEL_TYPE_UNSPECIFIED: PixelType
PIXEL_TYPE_UINT8: PixelType
PIXEL_TYPE_FLOAT32: PixelType
ENCODING_UNSPECIFIED: Encoding
ENCODING_RAW: Encoding
ENCODING_PNG: Encoding
ENCODING_JPEG: Encoding
IMAGE_KIND_UNSPECIFIED: ImageKind
IMAGE_KIND_ALIGNED_FACE: ImageKind
IMAGE_KIND_FULL_FRAME: ImageKind
FACE_SELECTION_UNSPECIFIED: FaceSelection
FACE_SELECTION_ALL: FaceSelection
FACE_SELECTION_LARGEST: FaceSelection
FACE_SELECTION_INDEX: FaceSelection
LOST_FACE_POLICY_UNSPECIFIED: LostFacePolicy
LOST_FACE_POLICY_PASS: LostFacePolicy
LOST_FACE_POLICY_HOLD: LostFacePolicy
LOST_FACE_POLICY_BLUR: LostFacePolicy
FACE_STATE_UNSPECIFIED: FaceState
FACE_STATE_DETECTED: FaceState
FACE_STATE_TRACKED: FaceState
FACE_STATE_LOST: FaceState
FACE_ACTION_UNSPECIFIED: FaceAction
FACE_ACTION_SWAPPED: FaceAction
FACE_ACTION_NOT_SWAPPED: FaceAction
FACE_ACTION_PASSED: FaceAction
FACE_ACTION_HELD: FaceAction
FACE_ACTION_BLURRED: FaceAction
FRAME_STATUS_UNSPECIFIED: FrameStatus
FRAME_STATUS_OK: FrameStatus
FRAME_STATUS_DROPPED: FrameStatus
FRAME_STATUS_ERROR: FrameStatus
STREAM_POLICY_UNSPECIFIED: StreamPolicy
STREAM_POLICY_QUEUE: StreamPolicy
STREAM_POLICY_LATEST: StreamPolicy
MODEL_STATUS_UNSPECIFIED: ModelStatus
MODEL_STATUS_LOADING: ModelStatus
MODEL_STATUS_READY: ModelStatus
MODEL_STATUS_FAILED: ModelStatus

class RawImage(_message.Message):
    __slots__ = ("pixels", "height", "width", "channels", "color_order", "pixel_type")
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    COLOR_ORDER_FIELD_NUMBER: _ClassVar[int]
    PIXEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    pixels: bytes
    height: int
    width: int
    channels: int
    color_order: ColorOrder
    pixel_type: PixelType
    def __init__(self, pixels: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., color_order: _Optional[_Union[ColorOrder, str]] = ..., pixel_type: _Optional[_Union[PixelType, str]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class SwapRequest(_message.Message):
    __slots__ = ("model", "target", "image", "kind", "output_encoding", "output_color_order", "jpeg_quality", "return_mask", "frame_id", "faces", "face_index", "keep_shape", "mapping", "return_region")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ENCODING_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_COLOR_ORDER_FIELD_NUMBER: _ClassVar[int]
    JPEG_QUALITY_FIELD_NUMBER: _ClassVar[int]
    RETURN_MASK_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    FACE_INDEX_FIELD_NUMBER: _ClassVar[int]
    KEEP_SHAPE_FIELD_NUMBER: _ClassVar[int]
    MAPPING_FIELD_NUMBER: _ClassVar[int]
    RETURN_REGION_FIELD_NUMBER: _ClassVar[int]
    model: str
    target: str
    image: Image
    kind: ImageKind
    output_encoding: Encoding
    output_color_order: ColorOrder
    jpeg_quality: int
    return_mask: bool
    frame_id: int
    faces: FaceSelection
    face_index: int
    keep_shape: float
    mapping: FaceMapping
    return_region: bool
    def __init__(self, model: _Optional[str] = ..., target: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., kind: _Optional[_Union[ImageKind, str]] = ..., output_encoding: _Optional[_Union[Encoding, str]] = ..., output_color_order: _Optional[_Union[ColorOrder, str]] = ..., jpeg_quality: _Optional[int] = ..., return_mask: _Optional[bool] = ..., frame_id: _Optional[int] = ..., faces: _Optional[_Union[FaceSelection, str]] = ..., face_index: _Optional[int] = ..., keep_shape: _Optional[float] = ..., mapping: _Optional[_Union[FaceMapping, _Mapping]] = ..., return_region: _Optional[bool] = ...) -> None: ...

class FaceMapping(_message.Message):
    __slots__ = ("rules", "match_threshold")
    RULES_FIELD_NUMBER: _ClassVar[int]
    MATCH_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    rules: _containers.RepeatedCompositeFieldContainer[FaceRule]
    match_threshold: float
    def __init__(self, rules: _Optional[_Iterable[_Union[FaceRule, _Mapping]]] = ..., match_threshold: _Optional[float] = ...) -> None: ...

class FaceRule(_message.Message):
    __slots__ = ("target", "selection", "track_id", "reference", "face_index")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    TRACK_ID_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    FACE_INDEX_FIELD_NUMBER: _ClassVar[int]
    target: str
    selection: FaceSelection
    track_id: int
    reference: FaceReference
    face_index: int
    def __init__(self, target: _Optional[str] = ..., selection: _Optional[_Union[FaceSelection, str]] = ..., track_id: _Optional[int] = ..., reference: _Optional[_Union[FaceReference, _Mapping]] = ..., face_index: _Optional[int] = ...) -> None: ...

class FaceReference(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: int
    y0: int
    x1: int
    y1: int
    def __init__(self, x0: _Optional[int] = ..., y0: _Optional[int] = ..., x1: _Optional[int] = ..., y1: _Optional[int] = ...) -> None: ...

class DetectedFace(_message.Message):
    __slots__ = ("box", "landmarks", "score", "swapped", "track_id", "state", "action", "target", "reference_distance", "note")
    BOX_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_FIELD_NUMBER: _ClassVar[int]
    TRACK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    box: Box
    landmarks: _containers.RepeatedCompositeFieldContainer[Point]
    score: float
    swapped: bool
    track_id: int
    state: FaceState
    action: FaceAction
    target: str
    reference_distance: float
    note: str
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., landmarks: _Optional[_Iterable[_Union[Point, _Mapping]]] = ..., score: _Optional[float] = ..., swapped: _Optional[bool] = ..., track_id: _Optional[int] = ..., state: _Optional[_Union[FaceState, str]] = ..., action: _Optional[_Union[FaceAction, str]] = ..., target: _Optional[str] = ..., reference_distance: _Optional[float] = ..., note: _Optional[str] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("decode_ms", "queue_ms", "inference_ms", "encode_ms", "total_ms", "batch_size", "detect_ms", "align_ms", "blend_ms", "track_ms", "embed_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DETECT_MS_FIELD_NUMBER: _ClassVar[int]
    ALIGN_MS_FIELD_NUMBER: _ClassVar[int]
    BLEND_MS_FIELD_NUMBER: _ClassVar[int]
    TRACK_MS_FIELD_NUMBER: _ClassVar[int]
    EMBED_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    queue_ms: float
    inference_ms: float
    encode_ms: float
    total_ms: float
    batch_size: int
    detect_ms: float
    align_ms: float
    blend_ms: float
    track_ms: float
    embed_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., detect_ms: _Optional[float] = ..., align_ms: _Optional[float] = ..., blend_ms: _Optional[float] = ..., track_ms: _Optional[float] = ..., embed_ms: _Optional[float] = ...) -> None: ...

class SwapResponse(_message.Message):
    __slots__ = ("image", "mask", "timings", "frame_id", "faces", "provenance", "request_id", "region")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    image: Image
    mask: Image
    timings: StageTimings
    frame_id: int
    faces: _containers.RepeatedCompositeFieldContainer[DetectedFace]
    provenance: Provenance
    request_id: str
    region: Box
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., mask: _Optional[_Union[Image, _Mapping]] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., frame_id: _Optional[int] = ..., faces: _Optional[_Iterable[_Union[DetectedFace, _Mapping]]] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ..., request_id: _Optional[str] = ..., region: _Optional[_Union[Box, _Mapping]] = ...) -> None: ...

class Provenance(_message.Message):
    __slots__ = ("synthetic", "digital_source_type", "model", "target", "manifest_sha256")
    SYNTHETIC_FIELD_NUMBER: _ClassVar[int]
    DIGITAL_SOURCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    synthetic: bool
    digital_source_type: str
    model: str
    target: str
    manifest_sha256: str
    def __init__(self, synthetic: _Optional[bool] = ..., digital_source_type: _Optional[str] = ..., model: _Optional[str] = ..., target: _Optional[str] = ..., manifest_sha256: _Optional[str] = ...) -> None: ...

class FrameError(_message.Message):
    __slots__ = ("code", "code_name", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    CODE_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    code_name: str
    message: str
    def __init__(self, code: _Optional[int] = ..., code_name: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class SwapStreamRequest(_message.Message):
    __slots__ = ("request", "policy", "lost_faces", "lost_face_frames")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    LOST_FACES_FIELD_NUMBER: _ClassVar[int]
    LOST_FACE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    request: SwapRequest
    policy: StreamPolicy
    lost_faces: LostFacePolicy
    lost_face_frames: int
    def __init__(self, request: _Optional[_Union[SwapRequest, _Mapping]] = ..., policy: _Optional[_Union[StreamPolicy, str]] = ..., lost_faces: _Optional[_Union[LostFacePolicy, str]] = ..., lost_face_frames: _Optional[int] = ...) -> None: ...

class SwapStreamResponse(_message.Message):
    __slots__ = ("status", "response", "error")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    status: FrameStatus
    response: SwapResponse
    error: FrameError
    def __init__(self, status: _Optional[_Union[FrameStatus, str]] = ..., response: _Optional[_Union[SwapResponse, _Mapping]] = ..., error: _Optional[_Union[FrameError, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "identities", "resolution", "backend", "status", "variant", "manifest_sha256", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    identities: _containers.RepeatedScalarFieldContainer[str]
    resolution: int
    backend: str
    status: ModelStatus
    variant: str
    manifest_sha256: str
    error: str
    def __init__(self, name: _Optional[str] = ..., identities: _Optional[_Iterable[str]] = ..., resolution: _Optional[int] = ..., backend: _Optional[str] = ..., status: _Optional[_Union[ModelStatus, str]] = ..., variant: _Optional[str] = ..., manifest_sha256: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_message_bytes", "max_image_side", "max_image_pixels", "image_formats", "max_faces_per_frame", "max_calls_per_client", "max_streams_per_client", "max_calls", "max_streams", "stream_window", "stream_idle_timeout_s", "max_queue", "max_face_rules", "max_reference_images", "max_reference_side", "max_frame_memory_bytes", "max_faces_detected")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FORMATS_FIELD_NUMBER: _ClassVar[int]
    MAX_FACES_PER_FRAME_FIELD_NUMBER: _ClassVar[int]
    MAX_CALLS_PER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_PER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    MAX_CALLS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    STREAM_WINDOW_FIELD_NUMBER: _ClassVar[int]
    STREAM_IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_FACE_RULES_FIELD_NUMBER: _ClassVar[int]
    MAX_REFERENCE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_REFERENCE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_FACES_DETECTED_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_image_side: int
    max_image_pixels: int
    image_formats: _containers.RepeatedScalarFieldContainer[str]
    max_faces_per_frame: int
    max_calls_per_client: int
    max_streams_per_client: int
    max_calls: int
    max_streams: int
    stream_window: int
    stream_idle_timeout_s: float
    max_queue: int
    max_face_rules: int
    max_reference_images: int
    max_reference_side: int
    max_frame_memory_bytes: int
    max_faces_detected: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_image_side: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., image_formats: _Optional[_Iterable[str]] = ..., max_faces_per_frame: _Optional[int] = ..., max_calls_per_client: _Optional[int] = ..., max_streams_per_client: _Optional[int] = ..., max_calls: _Optional[int] = ..., max_streams: _Optional[int] = ..., stream_window: _Optional[int] = ..., stream_idle_timeout_s: _Optional[float] = ..., max_queue: _Optional[int] = ..., max_face_rules: _Optional[int] = ..., max_reference_images: _Optional[int] = ..., max_reference_side: _Optional[int] = ..., max_frame_memory_bytes: _Optional[int] = ..., max_faces_detected: _Optional[int] = ...) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("version", "auth_required", "tls", "client_certificate_required", "default_stream_policy", "limits", "default_lost_faces", "default_lost_face_frames", "default_match_threshold", "detect_every", "processes", "default_keep_shape")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AUTH_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERTIFICATE_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STREAM_POLICY_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LOST_FACES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LOST_FACE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MATCH_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DETECT_EVERY_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_KEEP_SHAPE_FIELD_NUMBER: _ClassVar[int]
    version: str
    auth_required: bool
    tls: bool
    client_certificate_required: bool
    default_stream_policy: StreamPolicy
    limits: ServerLimits
    default_lost_faces: LostFacePolicy
    default_lost_face_frames: int
    default_match_threshold: float
    detect_every: int
    processes: int
    default_keep_shape: float
    def __init__(self, version: _Optional[str] = ..., auth_required: _Optional[bool] = ..., tls: _Optional[bool] = ..., client_certificate_required: _Optional[bool] = ..., default_stream_policy: _Optional[_Union[StreamPolicy, str]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., default_lost_faces: _Optional[_Union[LostFacePolicy, str]] = ..., default_lost_face_frames: _Optional[int] = ..., default_match_threshold: _Optional[float] = ..., detect_every: _Optional[int] = ..., processes: _Optional[int] = ..., default_keep_shape: _Optional[float] = ...) -> None: ...

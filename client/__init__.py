"""facetwin client SDK: swap faces through a facetwin server from Python.

    from facetwin.client import Client

    with Client("localhost:50051") as client:
        print(client.list_models())
        result = client.swap(face_bgr, "demo", "bob", color="bgr")   # OpenCV array in, BGR array out

Photo and video files (whole frames, faces found by the server; video with its audio) go through
swap_image_file / swap_video_file and their *_async twins (see facetwin.client.files); a camera, network stream
or pipe, as it plays, through swap_live / swap_live_async (facetwin.client.live).

Needs only grpcio, protobuf and numpy; video files and photos other than PNG/JPEG need PyAV, and the `facetwin`
command line lives in facetwin.client.cli (both: install facetwin[cli]).
"""

from .client import DEFAULT_ADDRESS, AsyncClient, Client
from .errors import (
    AnswerTooLargeError,
    AuthenticationError,
    CancelledError,
    DeadlineExceededError,
    FaceTwinError,
    InvalidInputError,
    MediaFileError,
    MissingPyAVError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServerError,
    UnavailableError,
    UnimplementedError,
    from_rpc_error,
)
from .files import swap_image_file, swap_image_file_async, swap_video_file, swap_video_file_async
from .live import LiveReport, swap_live, swap_live_async
from .mapping import FaceMapping, FaceRule
from .media import MediaInfo, probe
from .types import DetectedFace, FileReport, ModelInfo, Provenance, ServerInfo, StageTimings, SwapResult
from .video import VideoOptions

__all__ = [
    "Client",
    "AsyncClient",
    "DEFAULT_ADDRESS",
    "SwapResult",
    "StageTimings",
    "ModelInfo",
    "ServerInfo",
    "DetectedFace",
    "FaceMapping",
    "FaceRule",
    "Provenance",
    "FileReport",
    "swap_image_file",
    "swap_image_file_async",
    "swap_video_file",
    "swap_video_file_async",
    "swap_live",
    "swap_live_async",
    "LiveReport",
    "VideoOptions",
    "MediaInfo",
    "probe",
    "FaceTwinError",
    "InvalidInputError",
    "NotFoundError",
    "ResourceExhaustedError",
    "AnswerTooLargeError",
    "UnavailableError",
    "DeadlineExceededError",
    "UnimplementedError",
    "AuthenticationError",
    "PermissionDeniedError",
    "ServerError",
    "MediaFileError",
    "MissingPyAVError",
    "CancelledError",
    "from_rpc_error",
]

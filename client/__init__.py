"""facetwin client SDK: swap faces through a facetwin server from Python.

    from facetwin.client import Client

    with Client("localhost:50051") as client:
        print(client.list_models())
        result = client.swap(face_bgr, "demo", "bob", color="bgr")   # OpenCV array in, BGR array out

Needs only grpcio, protobuf and numpy; the `facetwin` command line lives in facetwin.client.cli
(install facetwin[cli]).
"""

from .client import DEFAULT_ADDRESS, AsyncClient, Client
from .errors import (
    AuthenticationError,
    DeadlineExceededError,
    FaceTwinError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServerError,
    UnavailableError,
    UnimplementedError,
    from_rpc_error,
)
from .types import DetectedFace, ModelInfo, StageTimings, SwapResult

__all__ = [
    "Client",
    "AsyncClient",
    "DEFAULT_ADDRESS",
    "SwapResult",
    "StageTimings",
    "ModelInfo",
    "DetectedFace",
    "FaceTwinError",
    "InvalidInputError",
    "NotFoundError",
    "ResourceExhaustedError",
    "UnavailableError",
    "DeadlineExceededError",
    "UnimplementedError",
    "AuthenticationError",
    "PermissionDeniedError",
    "ServerError",
    "from_rpc_error",
]

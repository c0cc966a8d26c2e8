"""The SDK's exceptions: one class per kind of failure a caller handles differently.

Every public SDK method raises only FaceTwinError subclasses, so callers never need to import grpc to
handle errors. The class says what to do next (fix the request, pick another model, back off, retry
elsewhere); `.code` keeps the exact gRPC status for logging, `.details` the server's message.
"""

from __future__ import annotations

import grpc

from facetwin.v1 import trailers

__all__ = [
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


class FaceTwinError(Exception):
    """Base class of every SDK error. `code` is the gRPC status, `details` the human-readable reason."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        # Passing both to Exception keeps the error picklable (args are replayed into __init__).
        super().__init__(code, details)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidInputError(FaceTwinError, ValueError):
    """The request is wrong (image bytes, shape, dtype, arguments); resending it unchanged fails again.

    Also a ValueError, because the SDK raises it for caller mistakes it catches before sending.
    """


class NotFoundError(FaceTwinError):
    """The model or target identity is not loaded on the server (see Client.list_models)."""


class ResourceExhaustedError(FaceTwinError):
    """The request is too large or the server is overloaded; send less or retry later."""


class AnswerTooLargeError(ResourceExhaustedError):
    """The server swapped the image but its encoded answer (`answer_bytes` long) is over the message limit: send the
    image's pixels instead (a whole frame is then answered with the changed region only), or ask for a smaller
    encoding. swap_image_file does the first by itself."""

    def __init__(self, code: grpc.StatusCode, details: str, answer_bytes: int) -> None:
        super().__init__(code, details)
        self.answer_bytes = answer_bytes

    def __reduce__(self) -> tuple:
        return type(self), (self.code, self.details, self.answer_bytes)


class UnavailableError(FaceTwinError):
    """The server cannot be reached, is draining, or the model is not ready; retry later or elsewhere."""


class DeadlineExceededError(FaceTwinError):
    """The call did not finish within its timeout."""


class UnimplementedError(FaceTwinError):
    """The server does not implement what was asked (e.g. full-frame swaps in this release)."""


class AuthenticationError(FaceTwinError):
    """The server wants credentials this call did not carry, or did not accept them: pass token= (or a client
    certificate) to Client."""


class PermissionDeniedError(FaceTwinError):
    """The credentials were accepted but do not allow this call."""


class ServerError(FaceTwinError):
    """Any other failure: an internal server error, a cancelled call, or a malformed response."""


class MediaFileError(InvalidInputError):
    """A local file cannot be used: it is not an image or video, has no video stream, cannot be decoded, or the
    output cannot be written there. Raised on this side, before or instead of a call; `path` names the file."""

    def __init__(self, path: object, details: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, f"{path}: {details}")
        self.path = str(path)

    def __str__(self) -> str:
        return self.details  # the path and what is wrong with it; the status code adds nothing for a local file

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.details.removeprefix(f"{self.path}: "))


class MissingPyAVError(MediaFileError, ImportError):
    """The work needs PyAV (FFmpeg), which the base install lacks: video files, photos other than PNG/JPEG, and photos
    larger than the server takes. Also an ImportError. `path` names the file, when there is one ("" otherwise)."""

    def __init__(self, path: object, details: str) -> None:
        InvalidInputError.__init__(self, grpc.StatusCode.FAILED_PRECONDITION,
                                   f"{path}: {details}" if path is not None else details)
        self.path = "" if path is None else str(path)

    def __reduce__(self) -> tuple:
        return type(self), (self.path or None, self.details.removeprefix(f"{self.path}: ") if self.path else
                            self.details)


class CancelledError(FaceTwinError):
    """The caller stopped the work (its cancel event was set); nothing half-written was left behind."""

    def __init__(self, details: str = "cancelled") -> None:
        super().__init__(grpc.StatusCode.CANCELLED, details)

    def __reduce__(self) -> tuple:
        return type(self), (self.details,)


_CLASS_BY_CODE: dict[grpc.StatusCode, type[FaceTwinError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidInputError,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


def error_for_code(code: grpc.StatusCode, details: str) -> FaceTwinError:
    """The FaceTwinError subclass instance for a status code (ServerError for unmapped codes)."""
    return _CLASS_BY_CODE.get(code, ServerError)(code, details)


def from_rpc_error(err: grpc.RpcError) -> FaceTwinError:
    """Converts a failed call (grpc.RpcError or grpc.aio.AioRpcError) into the matching FaceTwinError.

    A bare grpc.RpcError that is not also a grpc.Call carries no status; it maps to ServerError/UNKNOWN.
    """
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    if not details:
        # A grpc.Call's str() is a multi-line debug dump; only a bare RpcError's message is worth keeping.
        details = (str(err) if not callable(code_fn) else "") or f"call failed with {code.name}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        # gRPC's own words for a message over the server's --max-message-mb, refused before the server saw it.
        details += ("; the server's limit is Client.server_info().limits['max_message_bytes']: send a JPEG/PNG "
                    "file's bytes or downscale")
    answer_bytes = trailing_metadata(err).get(trailers.ANSWER_BYTES)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and answer_bytes is not None and answer_bytes.isdigit():
        return AnswerTooLargeError(code, details, int(answer_bytes))
    return error_for_code(code, details)


def trailing_metadata(err: grpc.RpcError) -> dict[str, str]:
    """A failed call's trailing metadata (facetwin.v1.trailers); empty for a bare RpcError."""
    trailing = getattr(err, "trailing_metadata", None)
    return dict(trailing() or ()) if callable(trailing) else {}

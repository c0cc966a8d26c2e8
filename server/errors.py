"""Domain errors raised by the engine and registry; the call interceptor ends the call with each one's gRPC
status code.

Messages are written for the caller: they say what was wrong and what to send instead.
"""

from __future__ import annotations

import grpc

from facetwin.v1 import trailers

ECHO_LIMIT = 64  # characters of a caller's value an error message repeats


def shorten(value: object, limit: int = ECHO_LIMIT) -> str:
    """repr() of a value a caller sent, cut to `limit` characters: messages stay readable and logs bounded."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class SwapError(Exception):
    """Base class: a request that cannot be served. `code` is the gRPC status the caller sees, `trailers` the
    trailing metadata sent with it."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    trailers: tuple[tuple[str, str], ...] = ()


class InvalidInputError(SwapError):
    """The request itself is wrong (bad image bytes, shape, dtype, enum value); resending it will fail again."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(SwapError):
    """The named model or target identity is not loaded."""

    code = grpc.StatusCode.NOT_FOUND


class PermissionDeniedError(SwapError):
    """The caller's credentials do not cover what it asked for (a model or identity outside its token's scope)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(SwapError):
    """The request is too large, or the server's queue is full; retry later or send less."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class AnswerTooLargeError(ResourceExhaustedError):
    """The swap was done but its encoded answer is over the message limit (a JPEG or PNG size is known only once
    encoded); the trailer says how large it was."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.trailers = ((trailers.ANSWER_BYTES, str(size)),)


class UnavailableError(SwapError):
    """The model is still loading, failed to load, or the server is draining; retry elsewhere or later."""

    code = grpc.StatusCode.UNAVAILABLE


class ModelFailedError(UnavailableError):
    """The model failed to load: asking this server again cannot help until it is restarted with a good bundle (another
    replica may have it)."""

    # gRPC's retry pushback: a negative delay tells a client's automatic retries to stop (gRFC A6).
    trailers = (("grpc-retry-pushback-ms", "-1"),)




class DrainingError(UnavailableError):
    """The server drains: a stream it took ends, every frame it took answered; the caller reconnects and resends."""

    trailers = ((trailers.RECONNECT, "1"),)

    def __init__(self) -> None:
        super().__init__("the server is shutting down: every frame it took was answered; reconnect (another replica, "
                         "or this one once it is back) and resend the frames after the last answer")


class DeadlineExceededError(SwapError):
    """The call's deadline passed before the server took it up: the caller has given up, so no work is done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnimplementedError(SwapError):
    """The request asks for something this server release does not do yet."""

    code = grpc.StatusCode.UNIMPLEMENTED

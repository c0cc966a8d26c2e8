"""Client and AsyncClient: a small facade over the facetwin.v1 FaceSwap gRPC service.

Both classes expose the same methods (list_models, swap, stream) and share every piece of logic that is
not I/O: argument checks, request building and response parsing (images.py), error mapping (errors.py),
and stream bookkeeping (StreamState). They differ only in how they wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

import grpc

from facetwin.v1 import facetwin_pb2 as pb
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc

from .credentials import PemInput, channel_credentials
from .errors import (
    CancelledError,
    DeadlineExceededError,
    FaceTwinError,
    InvalidInputError,
    ServerError,
    UnavailableError,
    error_for_code,
    from_rpc_error,
)
from .images import (
    ColorName,
    EncodingName,
    FacesArg,
    ImageInput,
    PolicyName,
    StreamState,
    build_swap_request,
    check_request_size,
    finish_scaled,
    may_scale,
    plan_scaled,
    result_from_response,
)
from .mapping import LostFaces
from .scaling import FrameLimits, ScaledFrame
from .types import ModelInfo, ServerInfo, SwapResult

__all__ = ["Client", "AsyncClient", "DEFAULT_ADDRESS"]

DEFAULT_ADDRESS = "localhost:50051"
_END = object()  # sentinel for an exhausted frame iterator
_SLOT_POLL_S = 0.05  # how often a blocked sync request thread checks whether the stream was abandoned
_SOURCE_RELEASE_S = 10.0  # how long an ended sync stream waits for a frame read under way on its request thread
_RECONNECT_POLL_S = 0.25  # how often a sync stream waiting for its server to come back checks for close()
_LIMITS_TIMEOUT_S = 10.0  # the most a first whole frame waits for the server's limits
# Unary calls are pure functions of their request, so gRPC itself sends one again when it ends UNAVAILABLE (a
# replica that went away mid-call: through a balancer or round_robin the retry reaches another), twice at most,
# ~0.2 and ~0.4 s later, within the call's deadline; a server that knows a retry is pointless (a model that failed
# to load) says so in its trailers. Calls a draining server never took are retried by gRPC in any case; streams
# resume by their own logic (resend what was not answered), not by this.
_SERVICE = pb.DESCRIPTOR.services_by_name["FaceSwap"].full_name
_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": _SERVICE, "method": method} for method in ("Swap", "ListModels", "GetServerInfo")],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.2s", "maxBackoff": "1s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]},
}]})
KEEPALIVE_S = 60  # during calls, a ping this often finds a connection that died silently (the server allows 10 s)


def _invalid(message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> InvalidInputError:
    return InvalidInputError(code, message)


def _remaining(ends_at: float | None) -> float | None:
    """Seconds left until a monotonic deadline (None: none); at least a millisecond, so gRPC reports the expiry."""
    return None if ends_at is None else max(ends_at - time.monotonic(), 1e-3)


def _check_timeout(timeout: float | None, name: str = "timeout") -> float | None:
    """Seconds as a float; None and infinity mean no deadline."""
    if timeout is None or (isinstance(timeout, float) and math.isinf(timeout) and timeout > 0):
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise _invalid(f"{name} must be a positive number of seconds or None (no deadline), got {timeout!r}")
    return float(timeout)


def _check_address(address: object) -> str:
    if not isinstance(address, str) or not address.strip():
        raise _invalid(f"address must be 'host:port', got {address!r}")
    port = re.search(r":(\d+)$", address)
    if port and not address.startswith("unix") and int(port.group(1)) > 65535:
        raise _invalid(f"address {address!r} names port {port.group(1)}: a port is 0..65535")
    return address


class _ClientBase:
    """Argument checks and request preparation common to Client and AsyncClient."""

    def __init__(self, address: str, *, timeout: float | None, max_message_mb: float, stream_resumes: int,
                 resume_timeout: float, **credentials: Any) -> None:
        _check_address(address)
        if isinstance(stream_resumes, bool) or not isinstance(stream_resumes, int) or stream_resumes < 0:
            raise _invalid(f"stream_resumes must be an integer >= 0, got {stream_resumes!r}")
        self.stream_resumes = stream_resumes
        # A stream resumes only while its server answers again within this; None would wait forever.
        self.resume_timeout = _check_timeout(resume_timeout, "resume_timeout")
        if self.resume_timeout is None:
            raise _invalid(f"resume_timeout must be a positive number of seconds, got {resume_timeout!r}")
        if isinstance(max_message_mb, bool) or not isinstance(max_message_mb, (int, float)) or not max_message_mb > 0:
            raise _invalid(f"max_message_mb must be a positive number, got {max_message_mb!r}")
        self.address = address
        self.timeout = _check_timeout(timeout)
        self._max_bytes = int(max_message_mb * 2**20)
        self._credentials = channel_credentials(address, **credentials)
        self._closed = False
        # The limits a whole frame sent as an array must fit (see scaling.py), asked of the server once, when the
        # first whole frame is sent; None (after asking) where the server does not say.
        self._frame_limits: FrameLimits | None = None
        self._frame_limits_known = False

    def _channel_options(self) -> list[tuple[str, int | str]]:
        return [
            # Raw 1080p frames are ~6 MiB, over gRPC's 4 MiB default, so both directions get the configured limit.
            ("grpc.max_send_message_length", self._max_bytes),
            ("grpc.max_receive_message_length", self._max_bytes),
            # gRPC would give every channel of a program with the same address and options one shared connection:
            # each client keeps its own, so a server of several processes can serve separate clients in separate ones.
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", _SERVICE_CONFIG),
            # A request is kept for its retries only while it fits this buffer (256 KiB by default): a raw frame is
            # megabytes.
            ("grpc.per_rpc_retry_buffer_size", self._max_bytes),
            ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
            ("grpc.keepalive_timeout_ms", 20_000),
        ]

    def _deadline(self, timeout: float | None) -> float | None:
        """A per-call timeout, or the client's default when None."""
        self._ensure_open()
        return self.timeout if timeout is None else _check_timeout(timeout)

    def _ensure_open(self) -> None:
        # CancelledError, as for a call that close() cut off: a loop that swaps until another thread or task closes
        # the client ends with the same error whether close() lands during a call or between two.
        if self._closed:
            raise CancelledError(f"this {type(self).__name__} is closed; create a new one")

    def _error(self, err: grpc.RpcError) -> FaceTwinError:
        """The FaceTwinError for a failed call; a call cut off by this client's close() is CancelledError."""
        if self._closed and err.code() == grpc.StatusCode.CANCELLED:
            return CancelledError("the client was closed while the call ran")
        return from_rpc_error(err)

    def _stream_error(self, state: StreamState, err: grpc.RpcError) -> BaseException:
        """The exception for a failed stream: the request side's own error wins (it caused the failure)."""
        return state.error if state.error is not None else self._error(err)

    def _swap_request(self, image: ImageInput, model: str, target: str, **kwargs: Any) -> pb.SwapRequest:
        request = build_swap_request(image, model, target, **kwargs)
        check_request_size(request, self._max_bytes)
        return request

    @property
    def max_message_bytes(self) -> int:
        """The largest message this client sends or receives (max_message_mb)."""
        return self._max_bytes

    def _limits_timeout(self) -> float:
        return min(self.timeout or _LIMITS_TIMEOUT_S, _LIMITS_TIMEOUT_S)

    def _keep_limits(self, info: ServerInfo | None, error: FaceTwinError | None = None) -> FrameLimits | None:
        """Records the server's limits. A server that could not be reached is asked again next time; one that does not
        answer GetServerInfo (or refuses it) gets frames as they are, and says itself what is too large."""
        if isinstance(error, (UnavailableError, DeadlineExceededError, CancelledError)):
            return None
        self._frame_limits_known = True
        if info is not None:
            self._frame_limits = FrameLimits.from_server(info.limits, self.max_message_bytes)
        return self._frame_limits

    def _prepare_swap(self, image: ImageInput, model: str, target: str, limits: FrameLimits | None,
                      **kwargs: Any) -> tuple[pb.SwapRequest, ScaledFrame | None]:
        """The request, with a whole frame over the server's limits sent scaled (asking for its mask to blend with)."""
        scaled = plan_scaled(image, kwargs["faces"], limits, color=kwargs["color"])
        if scaled is not None:
            image = scaled.small
            kwargs["return_mask"] = True
        return self._swap_request(image, model, target, **kwargs), scaled

    def _stream_setup(
        self, model: str, target: str, color: ColorName, return_mask: bool, max_in_flight: int, timeout: float | None,
        policy: PolicyName = "queue",
        faces: FacesArg = None,
        keep_shape: float | None = None,
        frame_errors: str = "raise",
        lost_faces: LostFaces | None = None,
        lost_face_frames: int | None = None,
    ) -> tuple[StreamState, float | None]:
        self._ensure_open()
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise _invalid(f"max_in_flight must be a positive integer, got {max_in_flight!r}")
        state = StreamState(model, target, color=color, return_mask=return_mask, max_bytes=self._max_bytes,
                            policy=policy, faces=faces, keep_shape=keep_shape, frame_errors=frame_errors,
                            lost_faces=lost_faces, lost_face_frames=lost_face_frames)
        # A stream's length is unbounded, so the client's default (unary) timeout does not apply to it.
        return state, _check_timeout(timeout)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(address={self.address!r})"


class Client(_ClientBase):
    """Blocking client. Thread-safe: one Client (one HTTP/2 connection) can serve many threads.

    timeout: default deadline in seconds for list_models and swap (None = wait forever); streams have
    no deadline unless stream(timeout=...) sets one. max_message_mb: largest message sent or received.
    token: bearer token of a server that asks for one (without TLS: loopback addresses only).
    root_certificates: PEM (bytes, or a file's path) of the CA that signed the server's certificate: TLS.
    tls: TLS trusting gRPC's bundled public roots, for a server whose certificate a public CA signed.
    client_certificate, client_key: PEM (bytes or path) for a server that asks for one (mutual TLS).
    stream_resumes: how often one stream may resume on a new connection after its server went away (UNAVAILABLE:
    a draining or restarted server, a lost connection): the frames not yet answered are sent again, so every frame
    gets a result or an error. resume_timeout: how long to wait for the address to answer again, seconds.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = 30.0,
        max_message_mb: float = 64,
        token: str | None = None,
        root_certificates: PemInput | None = None,
        client_certificate: PemInput | None = None,
        client_key: PemInput | None = None,
        tls: bool = False,
        stream_resumes: int = 3,
        resume_timeout: float = 30.0,
    ) -> None:
        super().__init__(address, timeout=timeout, max_message_mb=max_message_mb, token=token, tls=tls,
                         stream_resumes=stream_resumes, resume_timeout=resume_timeout,
                         root_certificates=root_certificates, client_certificate=client_certificate,
                         client_key=client_key)
        options = self._channel_options()
        if self._credentials is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, self._credentials, options=options)
        self._stub = pb_grpc.FaceSwapStub(self._channel)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models loaded on the server, sorted by name."""
        deadline = self._deadline(timeout)
        try:
            response = self._stub.ListModels(pb.ListModelsRequest(), timeout=deadline)
        except grpc.RpcError as err:
            raise self._error(err) from err
        return [ModelInfo.from_proto(m) for m in response.models]

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """The server's version, the credentials it wants and every limit in force."""
        try:
            response = self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self._deadline(timeout))
        except grpc.RpcError as err:
            raise self._error(err) from err
        return ServerInfo.from_proto(response)

    def frame_limits(self) -> FrameLimits | None:
        """The limits a whole frame sent as an array must fit (asked of the server once); None where it does not say."""
        if not self._frame_limits_known:
            try:
                return self._keep_limits(self.server_info(timeout=self._limits_timeout()))
            except FaceTwinError as exc:
                return self._keep_limits(None, exc)
        return self._frame_limits

    def swap(
        self,
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
        timeout: float | None = None,
    ) -> SwapResult:
        """Swaps one aligned face (or, with `faces`, the faces of a whole frame) to `target`.

        image: uint8 (H, W, 3) array whose channel order is `color` ("bgr" for OpenCV, "rgb" for PIL/ML
        code), or PNG/JPEG file bytes. Raw results come back in `color` order; with encoding "png" or
        "jpeg" the result's `encoded` holds the file bytes and `image` is None.
        faces: None (default) = `image` is an aligned face crop; "largest", "all" or an index (largest
        first) = `image` is a whole frame: the server detects, swaps and pastes back, and the result's
        `faces` lists every face it found (a frame with no face comes back unchanged); a FaceMapping = a whole
        frame whose faces are picked rule by rule, each to its own target (e.g. FaceMapping.person(photo): only the
        person in the photo). Each face of the result says what was done to it, to which target and why.
        keep_shape: whole frames only: how far each swapped face is bent toward the original face's shape, 0 (the
        target's) .. 1 (the original's); None = the server's default (0.5).
        """
        limits = self.frame_limits() if may_scale(image, faces, encoding) else None
        request, scaled = self._prepare_swap(
            image, model, target, limits, color=color, return_mask=return_mask, encoding=encoding,
            frame_id=frame_id, jpeg_quality=jpeg_quality, faces=faces, keep_shape=keep_shape,
        )
        deadline = self._deadline(timeout)
        try:
            response = self._stub.Swap(request, timeout=deadline)
        except grpc.RpcError as err:
            raise self._error(err) from err
        return finish_scaled(scaled, result_from_response(response, color=color, sent=request), return_mask)

    def stream(
        self,
        frames: Iterable[Any],
        model: str,
        target: str,
        *,
        color: ColorName,
        return_mask: bool = False,
        max_in_flight: int = 8,
        policy: PolicyName = "queue",
        faces: FacesArg = None,
        keep_shape: float | None = None,
        timeout: float | None = None,
        frame_errors: str = "raise",
        lost_faces: LostFaces | None = None,
        lost_face_frames: int | None = None,
    ) -> Iterator[SwapResult]:
        """Swaps a sequence of frames over one SwapStream call; yields results in frame order.

        Frames get ids 0, 1, 2, ... At most max_in_flight frames are outstanding: `frames` is not pulled
        further until results come back, so a camera or decoder is read at the speed the server serves.
        `frames` is iterated on a gRPC thread; once the stream has ended, raised or been left, that thread is out
        of `frames` for good (a read under way is waited for, up to 10 s), so the source may be closed at once.
        Frames the server drops yield dropped=True, image=None. A frame the server could not swap (a bad image, an
        unknown target) raises its FaceTwinError, which ends the loop; with frame_errors="yield" it is yielded as a
        result with `error` set and the stream goes on. Leaving the loop early cancels the call.
        timeout: deadline for the whole stream (None = none).
        policy: what the server does when it falls behind — "queue" swaps every frame (the server pushes
        back), "latest" answers frames it could not start before a newer one arrived as dropped (live
        video: raise max_in_flight above the server's window so the server sees the backlog).
        Whole frames are tracked: each face keeps its `track_id` from frame to frame. A FaceMapping (faces=...) is
        sent once, with the first frame. lost_faces: what shows where the server lost a face it was swapping
        ("pass": the frame as it is, "hold": its last swap, "blur"; None = the server's default) for up to
        lost_face_frames frames (1..300, None = the server's default).
        """
        state, deadline = self._stream_setup(model, target, color, return_mask, max_in_flight, timeout, policy, faces,
                                             keep_shape, frame_errors, lost_faces, lost_face_frames)
        try:
            frame_iter = iter(frames)
        except TypeError:
            raise _invalid(f"frames must be an iterable of images, got {type(frames).__name__}") from None
        return self._stream_results(frame_iter, state, max_in_flight, deadline)

    def _stream_results(
        self, frames: Iterator[Any], state: StreamState, max_in_flight: int, deadline: float | None
    ) -> Iterator[SwapResult]:
        slots = threading.Semaphore(max_in_flight)
        pulling = threading.Lock()  # held by gRPC's request thread while it is inside `frames`
        ends_at = None if deadline is None else time.monotonic() + deadline
        if state.faces is not None:  # whole frames: those over the server's limits are sent scaled
            state.limits = self.frame_limits()

        def requests(call_over: threading.Event, resend: list[pb.SwapStreamRequest]) -> Iterator[pb.SwapStreamRequest]:
            """One call's requests: the frames sent on an earlier call and not answered, then new ones."""
            try:
                yield from resend
                while True:
                    # Take a slot before pulling the next frame, so no more than max_in_flight are read ahead.
                    while not slots.acquire(timeout=_SLOT_POLL_S):
                        if call_over.is_set():
                            return
                    with pulling:
                        if call_over.is_set():
                            slots.release()
                            return
                        frame = next(frames, _END)
                        if frame is _END:
                            return
                        # Recorded before it is sent: a frame pulled for a call that then breaks is resent.
                        request = state.make_request(frame)
                    yield request
            except Exception as exc:  # ends the request side cleanly; the consumer re-raises it
                state.error = exc

        resumes = 0
        while True:
            call_over = threading.Event()
            call = self._stub.SwapStream(requests(call_over, state.resend()), timeout=_remaining(ends_at))
            try:
                for message in call:
                    slots.release()
                    yield state.on_response(message)
                state.finish()
                return
            except grpc.RpcError as err:
                if not state.can_resume(err, resumes, self.stream_resumes):
                    raise self._stream_error(state, err) from err
                resumes += 1
            finally:
                call_over.set()
                call.cancel()
                # Let a read under way finish: the next call (or, once the stream is over, the caller's closing of
                # its source, e.g. a cv2.VideoCapture) must not race it. A source stuck longer is left to that thread.
                if pulling.acquire(timeout=_SOURCE_RELEASE_S):
                    pulling.release()
            self._reconnect(ends_at)

    def _reconnect(self, ends_at: float | None) -> None:
        """Waits (up to resume_timeout) until the channel is connected again: the server drained and a replica, or
        the same server restarted, answers at the address. Closing the client ends the wait at once."""
        wait = self.resume_timeout if ends_at is None else min(self.resume_timeout, _remaining(ends_at))
        give_up = time.monotonic() + wait
        ready = grpc.channel_ready_future(self._channel)
        try:
            while not self._closed:
                left = give_up - time.monotonic()
                if left <= 0:
                    raise UnavailableError(grpc.StatusCode.UNAVAILABLE, f"the stream's server went away and "
                                           f"{self.address} did not answer again within {wait:.0f} s; the frames "
                                           "not yet answered were not swapped")
                try:
                    ready.result(timeout=min(left, _RECONNECT_POLL_S))
                    return
                except grpc.FutureTimeoutError:
                    pass
            raise CancelledError("the client was closed while its stream waited for the server to come back")
        finally:
            ready.cancel()

    def close(self) -> None:
        """Closes the connection; calls in progress are cancelled."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """asyncio client (grpc.aio) with Client's methods as coroutines; create it inside a running event loop.
    Takes Client's arguments, credentials included.

    Use `async with AsyncClient(...) as client:`, or `await client.close()`.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = 30.0,
        max_message_mb: float = 64,
        token: str | None = None,
        root_certificates: PemInput | None = None,
        client_certificate: PemInput | None = None,
        client_key: PemInput | None = None,
        tls: bool = False,
        stream_resumes: int = 3,
        resume_timeout: float = 30.0,
    ) -> None:
        super().__init__(address, timeout=timeout, max_message_mb=max_message_mb, token=token, tls=tls,
                         stream_resumes=stream_resumes, resume_timeout=resume_timeout,
                         root_certificates=root_certificates, client_certificate=client_certificate,
                         client_key=client_key)
        # grpc.aio binds the channel to the running loop; used from another, it fails with a bare RuntimeError.
        self._loop = _running_loop()
        if self._loop is None:
            raise _invalid("create AsyncClient inside the event loop that uses it (in an async function, e.g. under "
                           "asyncio.run)", grpc.StatusCode.FAILED_PRECONDITION)
        options = self._channel_options()
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        else:
            self._channel = grpc.aio.secure_channel(address, self._credentials, options=options)
        self._stub = pb_grpc.FaceSwapStub(self._channel)

    def _ensure_open(self) -> None:
        super()._ensure_open()
        if _running_loop() is not self._loop:
            raise _invalid("this AsyncClient belongs to another event loop (the one it was created in); create one "
                           "in each loop that uses it", grpc.StatusCode.FAILED_PRECONDITION)

    @contextlib.contextmanager
    def _closed_is_cancelled(self) -> Iterator[None]:
        """grpc.aio ends a call cut off by close() with asyncio.CancelledError, as if the caller's task had been
        cancelled: outside a real cancellation of the task, it is the client's CancelledError (a FaceTwinError)."""
        try:
            yield
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and not (task is not None and getattr(task, "cancelling", lambda: 0)()):
                raise CancelledError("the client was closed while the call ran") from None
            raise

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models loaded on the server, sorted by name."""
        deadline = self._deadline(timeout)
        try:
            with self._closed_is_cancelled():
                response = await self._stub.ListModels(pb.ListModelsRequest(), timeout=deadline)
        except grpc.RpcError as err:
            raise self._error(err) from err
        return [ModelInfo.from_proto(m) for m in response.models]

    async def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """The server's version, the credentials it wants and every limit in force."""
        try:
            with self._closed_is_cancelled():
                response = await self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self._deadline(timeout))
        except grpc.RpcError as err:
            raise self._error(err) from err
        return ServerInfo.from_proto(response)

    async def frame_limits(self) -> FrameLimits | None:
        """See Client.frame_limits."""
        if not self._frame_limits_known:
            try:
                return self._keep_limits(await self.server_info(timeout=self._limits_timeout()))
            except FaceTwinError as exc:
                return self._keep_limits(None, exc)
        return self._frame_limits

    async def swap(
        self,
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
        timeout: float | None = None,
    ) -> SwapResult:
        """Swaps one aligned face to `target`; see Client.swap."""
        limits = await self.frame_limits() if may_scale(image, faces, encoding) else None
        request, scaled = self._prepare_swap(
            image, model, target, limits, color=color, return_mask=return_mask, encoding=encoding,
            frame_id=frame_id, jpeg_quality=jpeg_quality, faces=faces, keep_shape=keep_shape,
        )
        deadline = self._deadline(timeout)
        try:
            with self._closed_is_cancelled():
                response = await self._stub.Swap(request, timeout=deadline)
        except grpc.RpcError as err:
            raise self._error(err) from err
        return finish_scaled(scaled, result_from_response(response, color=color, sent=request), return_mask)

    def stream(
        self,
        frames: Iterable[Any] | AsyncIterable[Any],
        model: str,
        target: str,
        *,
        color: ColorName,
        return_mask: bool = False,
        max_in_flight: int = 8,
        policy: PolicyName = "queue",
        faces: FacesArg = None,
        keep_shape: float | None = None,
        timeout: float | None = None,
        frame_errors: str = "raise",
        lost_faces: LostFaces | None = None,
        lost_face_frames: int | None = None,
    ) -> AsyncIterator[SwapResult]:
        """Swaps frames from an iterable or async iterable; `async for` over the results. See Client.stream.

        A plain iterable is pulled on the event loop, so it should not block (wrap a blocking camera or
        decoder in an async generator that uses asyncio.to_thread). Breaking out of the loop cancels the
        call once the generator is closed (use contextlib.aclosing to close it at once).

        The first frame is answered before the rest are sent, so a bad model or target raises its real
        error. A server-side failure later in the stream can surface as ServerError (INTERNAL): grpc.aio
        loses the server's status when a write races the server ending the call (grpc/grpc#36066).
        """
        state, deadline = self._stream_setup(model, target, color, return_mask, max_in_flight, timeout, policy, faces,
                                             keep_shape, frame_errors, lost_faces, lost_face_frames)
        if not isinstance(frames, (Iterable, AsyncIterable)):
            raise _invalid(f"frames must be an iterable or async iterable of images, got {type(frames).__name__}")
        return self._stream_results(frames, state, max_in_flight, deadline)

    async def _stream_results(
        self, frames: Iterable[Any] | AsyncIterable[Any], state: StreamState, max_in_flight: int,
        deadline: float | None,
    ) -> AsyncIterator[SwapResult]:
        slots = asyncio.Semaphore(max_in_flight)
        source = _pull_frames(frames, slots)
        pull: list[asyncio.Future | None] = [None]  # a frame being pulled; it outlives a call that breaks meanwhile
        ends_at = None if deadline is None else time.monotonic() + deadline
        if state.faces is not None:  # whole frames: those over the server's limits are sent scaled
            state.limits = await self.frame_limits()

        async def write_requests(call, answered: asyncio.Event, call_over: asyncio.Event,
                                 resend: list[pb.SwapStreamRequest]) -> None:
            try:
                for message in resend:  # sent on an earlier call and not answered
                    await call.write(message)
                while True:
                    if pull[0] is None:
                        pull[0] = asyncio.ensure_future(anext(source, _END))
                    over = asyncio.ensure_future(call_over.wait())
                    try:
                        await asyncio.wait({pull[0], over}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        over.cancel()
                    if not pull[0].done():
                        return  # this call is over; the frame being pulled goes to the next one
                    frame, pull[0] = pull[0].result(), None
                    if frame is _END:
                        break
                    await call.write(state.make_request(frame))  # recorded first: resent if this call breaks
                    if state.sent == 1:
                        # A stream the server refuses (a limit, a bad policy) ends at its first frame. Sending more
                        # before that answer would race the server's abort, and grpc.aio then reports INTERNAL
                        # instead of the server's status (see _lost_status); one round trip of latency avoids it.
                        await answered.wait()
                await call.done_writing()
            except (asyncio.InvalidStateError, grpc.RpcError):
                return  # the call already ended; the reader reports why
            except Exception as exc:  # ends the request side cleanly; the reader re-raises it
                state.error = exc
                with contextlib.suppress(asyncio.InvalidStateError, grpc.RpcError):
                    await call.done_writing()

        resumes = 0
        try:
            with self._closed_is_cancelled():
                while True:
                    call = self._stub.SwapStream(timeout=_remaining(ends_at))
                    answered, call_over = asyncio.Event(), asyncio.Event()
                    writer = asyncio.create_task(write_requests(call, answered, call_over, state.resend()))
                    try:
                        while (message := await call.read()) is not grpc.aio.EOF:
                            answered.set()
                            slots.release()
                            yield state.on_response(message)
                        answered.set()
                        await writer
                        state.finish()
                        return
                    except grpc.RpcError as err:
                        lost = state.error is None and _lost_status(err)
                        taken = False
                        if lost and state.received == 0:
                            refusal = await self._opening_refusal(ends_at)
                            if refusal is not None:
                                raise refusal from err
                            taken = True  # the server takes streams: the one that ended this call drained
                        if not state.can_resume(err, resumes, self.stream_resumes, status_lost=lost, taken=taken):
                            if lost:
                                raise ServerError(
                                    grpc.StatusCode.INTERNAL,
                                    f"the server ended the stream after {state.received} results while frames were "
                                    "still being sent, and grpc.aio hides its status in that case "
                                    "(grpc/grpc#36066); Client.stream reports it") from err
                            raise self._stream_error(state, err) from err
                        resumes += 1
                    finally:
                        call_over.set()
                        answered.set()
                        call.cancel()
                        await asyncio.gather(writer, return_exceptions=True)
                    await self._reconnect(ends_at)
        finally:
            if pull[0] is not None:
                pull[0].cancel()
                await asyncio.gather(pull[0], return_exceptions=True)
            await source.aclose()

    async def _opening_refusal(self, ends_at: float | None) -> FaceTwinError | None:
        """Why a stream ended before its first answer with a status grpc.aio lost (see _lost_status); None when the
        server now takes streams. A refusal at the opening (credentials, a stream limit, a server that is away)
        comes before the server reads a frame: a call that sends no frame is refused the same way and keeps its
        status. One that is taken ends with "no frame" (INVALID_ARGUMENT)."""
        probe = self._stub.SwapStream(timeout=min(_remaining(ends_at) or 10.0, 10.0))
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            await probe.done_writing()
        code = await probe.code()
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK):
            return None
        return error_for_code(code, await probe.details())

    async def _reconnect(self, ends_at: float | None) -> None:
        """Waits (up to resume_timeout) until the channel is connected again; see Client._reconnect."""
        wait = self.resume_timeout if ends_at is None else min(self.resume_timeout, _remaining(ends_at))
        give_up = time.monotonic() + wait
        while not self._closed:
            left = give_up - time.monotonic()
            if left <= 0:
                raise UnavailableError(grpc.StatusCode.UNAVAILABLE, f"the stream's server went away and "
                                       f"{self.address} did not answer again within {wait:.0f} s; the frames not "
                                       "yet answered were not swapped")
            try:
                await asyncio.wait_for(self._channel.channel_ready(), min(left, _RECONNECT_POLL_S))
                return
            except TimeoutError:
                pass
        raise CancelledError("the client was closed while its stream waited for the server to come back")

    async def close(self) -> None:
        """Closes the connection; calls in progress are cancelled."""
        if not self._closed:
            self._closed = True
            await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _lost_status(err: grpc.RpcError) -> bool:
    """True for grpc.aio's INTERNAL that replaces the server's status when a write fails on an ended call."""
    debug = getattr(err, "debug_error_string", lambda: "")() or ""
    return err.code() == grpc.StatusCode.INTERNAL and "SendMessageOperation" in debug


async def _pull_frames(frames: Iterable[Any] | AsyncIterable[Any], slots: asyncio.Semaphore) -> AsyncIterator[Any]:
    """Yields frames from a sync or async iterable, taking a flow-control slot before pulling each one."""
    if isinstance(frames, AsyncIterable):
        iterator = aiter(frames)
        while True:
            await slots.acquire()
            try:
                frame = await anext(iterator)
            except StopAsyncIteration:
                return
            yield frame
    else:
        frame_iter = iter(frames)
        while True:
            await slots.acquire()
            frame = next(frame_iter, _END)
            if frame is _END:
                return
            yield frame

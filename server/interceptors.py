"""The one place every call is accounted for: its request id, its status, its duration, its log line.

Handlers raise domain errors (errors.SwapError, each carrying its gRPC status code) and this interceptor answers
them with that status and the error's message; any other exception is a bug, answered INTERNAL and logged with its
traceback. A status set elsewhere (`context.abort` in a handler or a later interceptor) is counted as it stands.

Per call:
- the request id: the caller's `x-request-id` metadata when it is printable ASCII of at most 128 characters, else
  a fresh uuid4 hex; it is sent back as `x-request-id` trailing metadata, is in every log line written while
  serving the call, and the servicer copies it into each SwapResponse (logs.current_request_id);
- facetwin_requests_total (every status, OK included) and the duration histogram, labelled by method and by the
  model and target the request names (bounded: see metrics.LabelBound); the in-flight / open-stream gauges;
- one log line when the call ends in an error: INFO for the caller's errors (no traceback), ERROR with the
  traceback for the server's faults. Successful calls log at DEBUG.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf import descriptor_pool

from . import logs, metrics, tracing
from .auth import client_id
from .errors import SwapError

log = logging.getLogger("facetwin.server.calls")

REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID = 128
MAX_LOGGED_MESSAGE = 300  # characters of an error message in the log line
MAX_CACHED_HANDLERS = 256
SERVER_FAULTS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})


def request_id_from(metadata: Any) -> str:
    """The caller's x-request-id when usable in logs and headers, else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            if isinstance(value, str) and 0 < len(value) <= MAX_REQUEST_ID and value.isascii() and value.isprintable():
                return value
            break
    return uuid.uuid4().hex


def _named(message: Any) -> tuple[str, str] | None:
    """(model, target) a request names: a SwapRequest's, or the one inside a SwapStreamRequest; None when its type
    names no model (ListModels, health checks, ...)."""
    inner = getattr(message, "request", None)
    if hasattr(inner, "DESCRIPTOR"):
        message = inner
    descriptor = getattr(message, "DESCRIPTOR", None)
    if descriptor is None or "model" not in descriptor.fields_by_name:
        return None
    return str(message.model), str(getattr(message, "target", ""))


class _Call:
    """One call being served."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext, streaming: bool,
                 bound: Callable[[str, str], tuple[str, str]], gauge: Any,
                 cut_off_at: Callable[[], float | None]) -> None:
        self.method, self.context, self.streaming, self.bound = method, context, streaming, bound
        self.cut_off_at = cut_off_at
        self.started = time.perf_counter()
        self.request_id = request_id_from(context.invocation_metadata())
        # Read while the call is alive: a streaming handler's generator may be closed by the event loop after the
        # call is gone, and gRPC's peer() on a finished call dereferences a null pointer (the process segfaults).
        self.peer, self.client = context.peer(), client_id(context)
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else self.started + remaining
        self.names: tuple[str, str] | None = None
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))
        self._log_token = logs.bind_call(request_id=self.request_id, method=method)
        tracing.annotate(request_id=self.request_id)
        self._gauge = gauge  # the method's in-flight or open-streams gauge
        gauge.inc()

    def read(self, message: Any) -> None:
        if self.names is None:
            self.names = _named(message)

    async def watch(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """A client stream, passed through; its first message names the call's model and target."""
        async for message in requests:
            self.read(message)
            yield message

    def labels(self) -> tuple[str, str]:
        return ("", "") if self.names is None else self.bound(*self.names)

    def finish(self, code: grpc.StatusCode, message: str = "", exc: BaseException | None = None) -> None:
        seconds = time.perf_counter() - self.started
        model, target = self.labels()
        if self.names is not None:
            tracing.annotate(model=model, target=target)
        metrics.REQUESTS.labels(self.method, model, target, code.name).inc()
        if self.streaming:
            metrics.STREAM_SECONDS.labels(self.method).observe(seconds)
        else:
            metrics.REQUEST_SECONDS.labels(self.method, model, target).observe(seconds)
        fault = code in SERVER_FAULTS
        level = logging.ERROR if fault else logging.INFO if code != grpc.StatusCode.OK else logging.DEBUG
        if not log.isEnabledFor(level):
            return
        message = " ".join(message.split())  # one line, whatever the message held
        if len(message) > MAX_LOGGED_MESSAGE:
            message = message[:MAX_LOGGED_MESSAGE] + "..."
        fields = {"request_id": self.request_id, "method": self.method, "code": code.name, "peer": self.peer,
                  "client": self.client, "model": model, "target": target,
                  "duration_ms": round(seconds * 1e3, 2), "error": message}
        log.log(level, "%s %s in %.1f ms (client %s, model %s, target %s)%s", self.method, code.name, seconds * 1e3,
                fields["client"], model or "-", target or "-", f": {message}" if message else "",
                exc_info=exc if fault else None, extra=fields)

    async def fail(self, exc: BaseException) -> NoReturn:
        """Counts and logs the error, answers it with its status, and re-raises."""
        # The caller left, its deadline passed, or the server stopped before the call ended.
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            now = time.perf_counter()
            cut_off = self.cut_off_at()
            if self.deadline is not None and now >= self.deadline:
                self.finish(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed")
            elif cut_off is not None and now >= cut_off:
                self.finish(grpc.StatusCode.UNAVAILABLE, "cut off: the server stopped before the call ended (the "
                                                         "drain's grace ran out, or a second SIGTERM)")
            else:
                self.finish(grpc.StatusCode.CANCELLED, "the caller cancelled the call")
            raise exc
        if isinstance(exc, grpc.aio.AbortError) or not isinstance(exc, Exception):  # the status is already set
            self.finish(self.context.code() or grpc.StatusCode.UNKNOWN, self.context.details() or "")
            raise exc
        trailers: tuple[tuple[str, str], ...] = ()
        if isinstance(exc, SwapError):
            code, message, trailers = exc.code, str(exc), exc.trailers
            self.finish(code, message, exc)
        else:  # a bug: the caller learns where to look, the log gets what happened
            code = grpc.StatusCode.INTERNAL
            message = f"internal error ({type(exc).__name__}); the server log has it under request id {self.request_id}"
            self.finish(code, f"{type(exc).__name__}: {exc}", exc)
        await self.context.abort(code, message, trailers)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    def close(self) -> None:
        self._gauge.dec()
        logs.unbind_call(self._log_token)


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Accounts for every call of every service; `bound` maps a named (model, target) to metric labels."""

    def __init__(self, bound: Callable[[str, str], tuple[str, str]]) -> None:
        self.bound = bound
        # perf_counter() time from which the server ends the calls still running (the end of its drain's grace):
        # a call cancelled after it was cut off by the server, not by its caller.
        self.cut_off_at: float | None = None
        # Wrapped handlers, by the identity of the handler they wrap: a service's handlers are the same objects call
        # after call; handlers made per call (an authentication refusal) are dropped when the cache fills.
        self._wrapped: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED itself
            return None
        cached = self._wrapped.get(id(handler))
        if cached is None or cached[0] is not handler:
            if len(self._wrapped) >= MAX_CACHED_HANDLERS:
                self._wrapped.clear()
            cached = (handler, self._wrap_handler(handler, handler_call_details.method))
            self._wrapped[id(handler)] = cached
        return cached[1]

    def _wrap_handler(self, handler: grpc.RpcMethodHandler, full_name: str) -> grpc.RpcMethodHandler:
        method = full_name.rsplit("/", 1)[-1]
        # Gauges and histograms follow the method's declared kind: a handler may differ from it (the authentication
        # refusal is a streaming handler whatever the method, so that it reads no request).
        try:
            declared = descriptor_pool.Default().FindMethodByName(full_name.strip("/").replace("/", "."))
            streaming = declared.client_streaming or declared.server_streaming
        except KeyError:  # a service without a protobuf descriptor
            streaming = handler.request_streaming or handler.response_streaming
        for kind, make in (("unary_unary", grpc.unary_unary_rpc_method_handler),
                           ("unary_stream", grpc.unary_stream_rpc_method_handler),
                           ("stream_unary", grpc.stream_unary_rpc_method_handler),
                           ("stream_stream", grpc.stream_stream_rpc_method_handler)):
            behavior = getattr(handler, kind)
            if behavior is not None:
                wrapped = self._wrap(behavior, method, handler.request_streaming, streaming)
                return make(wrapped, request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler

    def _wrap(self, behavior, method: str, request_streaming: bool, streaming: bool):
        bound = self.bound
        gauge = (metrics.STREAMS_OPEN if streaming else metrics.CALLS_IN_FLIGHT).labels(method)

        def begin(request, context) -> tuple[_Call, Any]:
            call = _Call(method, context, streaming, bound, gauge, lambda: self.cut_off_at)
            if request_streaming:
                return call, call.watch(request)
            call.read(request)
            return call, request

        if inspect.isasyncgenfunction(behavior):  # a handler that yields its responses
            async def answer_stream(request, context):
                call, request = begin(request, context)
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as exc:
                    await call.fail(exc)
                else:
                    call.finish(grpc.StatusCode.OK)
                finally:
                    call.close()
            return answer_stream

        if not inspect.iscoroutinefunction(behavior):  # a synchronous handler: none in this server
            return behavior

        async def answer(request, context):  # one response, or responses written with context.write
            call, request = begin(request, context)
            try:
                response = await behavior(request, context)
            except BaseException as exc:
                await call.fail(exc)
            else:
                call.finish(grpc.StatusCode.OK)
                return response
            finally:
                call.close()
        return answer

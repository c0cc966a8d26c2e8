"""Status code -> FaceTwinError mapping, checked on real failed gRPC calls (sync and grpc.aio).

A tiny in-process gRPC server aborts each call with the status code named in the request, so every
error passed to from_rpc_error is the object grpc itself raises, not a hand-made stand-in.
"""

import pickle
import time
from concurrent import futures

import grpc
import pytest

from facetwin.client import (
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

EXPECTED = {
    grpc.StatusCode.CANCELLED: ServerError,
    grpc.StatusCode.UNKNOWN: ServerError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: ServerError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidInputError,
    grpc.StatusCode.ABORTED: ServerError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidInputError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: ServerError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.DATA_LOSS: ServerError,
}
METHOD = "/facetwin.test.Failing/Fail"


def test_every_status_code_but_ok_is_covered():
    assert set(EXPECTED) == set(grpc.StatusCode) - {grpc.StatusCode.OK}


def _fail(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"SLEEP":
        time.sleep(1.0)
        return b""
    if request == b"NO_DETAILS":
        context.set_code(grpc.StatusCode.DATA_LOSS)  # a status without details
        return b""
    code = grpc.StatusCode[request.decode()]
    context.abort(code, f"server says {code.name}")


@pytest.fixture(scope="module")
def failing_address():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "facetwin.test.Failing", {"Fail": grpc.unary_unary_rpc_method_handler(_fail)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.mark.parametrize("code", list(EXPECTED), ids=lambda c: c.name)
def test_sync_rpc_errors_map_to_their_class(failing_address, code):
    with grpc.insecure_channel(failing_address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(METHOD)(code.name.encode(), timeout=10)
    error = from_rpc_error(caught.value)
    assert type(error) is EXPECTED[code]
    assert error.code == code
    assert error.details == f"server says {code.name}"
    assert str(error) == f"{code.name}: server says {code.name}"


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.INTERNAL], ids=lambda c: c.name)
async def test_aio_rpc_errors_map_to_their_class(failing_address, code):
    async with grpc.aio.insecure_channel(failing_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(METHOD)(code.name.encode(), timeout=10)
    error = from_rpc_error(caught.value)
    assert type(error) is EXPECTED[code] and error.code == code
    assert error.details == f"server says {code.name}"


def test_expired_deadline_maps_to_deadline_exceeded(failing_address):
    with grpc.insecure_channel(failing_address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(METHOD)(b"SLEEP", timeout=0.05)
    error = from_rpc_error(caught.value)
    assert isinstance(error, DeadlineExceededError) and "\n" not in error.details


def test_status_without_details_gets_a_one_line_message(failing_address):
    with grpc.insecure_channel(failing_address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(METHOD)(b"NO_DETAILS", timeout=10)
    error = from_rpc_error(caught.value)
    assert type(error) is ServerError and error.details == "call failed with DATA_LOSS"


def test_bare_rpc_error_without_status_is_a_server_error():
    error = from_rpc_error(grpc.RpcError("transport went away"))
    assert type(error) is ServerError and error.code == grpc.StatusCode.UNKNOWN
    assert error.details == "transport went away"


def test_errors_are_picklable_and_share_a_base():
    error = NotFoundError(grpc.StatusCode.NOT_FOUND, "model 'x' is not loaded")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is NotFoundError and copy.code == error.code and copy.details == error.details
    assert all(issubclass(cls, FaceTwinError) for cls in EXPECTED.values())
    assert issubclass(InvalidInputError, ValueError)

"""Client and AsyncClient against a real facetwin server (the served_model fixture), plus offline checks.

Swaps run one at a time or in small stream batches; results of the same face computed in batches of
different sizes may differ by a rounding step, hence the 2-level tolerance where two calls are compared.
"""

import asyncio
import itertools
import socket
import subprocess
import sys
import threading
import time

import cv2
import grpc
import numpy as np
import pytest

import facetwin.client
from facetwin.client import (
    AsyncClient,
    CancelledError,
    Client,
    DeadlineExceededError,
    InvalidInputError,
    ModelInfo,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from facetwin.v1 import facetwin_pb2 as pb
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc

UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: connection refused at once
TOLERANCE = 2  # uint8 levels: same face, different batch composition


def assert_close(a: np.ndarray, b: np.ndarray, atol: int = TOLERANCE) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    assert np.abs(a.astype(np.int16) - b.astype(np.int16)).max() <= atol


@pytest.fixture(scope="module")
def pair(served_model):
    """(source identity face RGB, target identity)."""
    source, target = served_model.identities[0], served_model.identities[1]
    return served_model.sample_faces[source][0], target


@pytest.fixture(scope="module")
def client(served_model):
    with Client(served_model.address) as c:
        yield c


# ---------------------------------------------------------------- offline: no server needed


def test_sdk_imports_without_cli_or_ml_packages():
    blocked = ("typer", "tqdm", "cv2", "av", "torch", "onnxruntime")
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None  # any import of them now fails\n"
        "import facetwin.client\n"
        "from facetwin.client import Client, AsyncClient, SwapResult, StageTimings, ModelInfo, FaceTwinError\n"
        "from facetwin.client import swap_image_file, swap_video_file, VideoOptions, FileReport, MediaFileError\n"
        "Client('127.0.0.1:1').close()\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_public_names():
    for name in ("Client", "AsyncClient", "SwapResult", "StageTimings", "ModelInfo", "FaceTwinError",
                 "InvalidInputError", "NotFoundError", "ResourceExhaustedError", "UnavailableError",
                 "DeadlineExceededError", "UnimplementedError", "ServerError", "MediaFileError", "CancelledError",
                 "FileReport", "VideoOptions", "swap_image_file", "swap_image_file_async", "swap_video_file",
                 "swap_video_file_async", "probe", "MediaInfo"):
        assert name in facetwin.client.__all__ and hasattr(facetwin.client, name)


def test_caller_mistakes_fail_locally_before_any_network():
    # The address is unreachable, so reaching the network would raise UnavailableError instead.
    with Client(UNREACHABLE) as c:
        with pytest.raises(InvalidInputError, match="uint8"):
            c.swap(np.zeros((8, 8, 3), np.float32), "m", "t", color="rgb")
        with pytest.raises(InvalidInputError, match="color"):
            c.swap(np.zeros((8, 8, 3), np.uint8), "m", "t", color="BGR")
        with pytest.raises(InvalidInputError, match="max_in_flight"):
            c.stream([], "m", "t", color="rgb", max_in_flight=0)  # raised by the call, not the first next()
        with pytest.raises(InvalidInputError, match="timeout"):
            c.list_models(timeout=0)
    for kwargs, message in (({"timeout": -1}, "timeout"), ({"max_message_mb": 0}, "max_message_mb"),
                            ({"address": ""}, "address"), ({"address": "127.0.0.1:99999"}, "port"),
                            ({"resume_timeout": None}, "resume_timeout"), ({"resume_timeout": 0}, "resume_timeout")):
        with pytest.raises(InvalidInputError, match=message):
            Client(**{"address": UNREACHABLE, **kwargs})


def test_an_infinite_timeout_means_no_deadline():
    with Client(UNREACHABLE, timeout=float("inf")) as c:
        assert c.timeout is None
        assert c._deadline(float("inf")) is None


def test_an_async_client_belongs_to_the_event_loop_it_was_made_in():
    with pytest.raises(InvalidInputError, match="inside the event loop"):
        AsyncClient(UNREACHABLE)

    async def make() -> AsyncClient:
        return AsyncClient(UNREACHABLE)

    client = asyncio.run(make())
    with pytest.raises(InvalidInputError, match="another event loop"):
        asyncio.run(client.list_models())


def test_oversized_request_is_rejected_locally():
    with Client(UNREACHABLE, max_message_mb=0.01) as c:  # 10 KiB < 64*64*3 bytes
        with pytest.raises(ResourceExhaustedError, match="max_message_mb"):
            c.swap(np.zeros((64, 64, 3), np.uint8), "m", "t", color="rgb")


def test_unreachable_server_raises_unavailable():
    with Client(UNREACHABLE) as c:
        with pytest.raises(UnavailableError):
            c.list_models()
        with pytest.raises(UnavailableError):
            list(c.stream([np.zeros((8, 8, 3), np.uint8)], "m", "t", color="rgb"))


async def test_async_unreachable_server_raises_unavailable():
    async with AsyncClient(UNREACHABLE) as c:
        with pytest.raises(UnavailableError):
            await c.list_models()


@pytest.mark.parametrize("client_class", [Client, AsyncClient])
def test_each_client_has_a_connection_of_its_own(client_class):
    """Two clients of one program to one address open two TCP connections, so a server of several processes
    (--processes) can serve them in different ones. The listener accepts and never answers: each call times out."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(10)
        address = f"127.0.0.1:{listener.getsockname()[1]}"

        async def call_twice() -> None:
            async with AsyncClient(address) as a, AsyncClient(address) as b:
                for c in (a, b):
                    with pytest.raises((DeadlineExceededError, UnavailableError)):
                        await c.list_models(timeout=0.5)

        if client_class is AsyncClient:
            asyncio.run(call_twice())
        else:
            with Client(address) as a, Client(address) as b:
                for c in (a, b):
                    with pytest.raises((DeadlineExceededError, UnavailableError)):
                        c.list_models(timeout=0.5)
        accepted = [listener.accept()[0] for _ in range(2)]  # a shared connection leaves the second accept waiting
        for connection in accepted:
            connection.close()


class FlakyServicer(pb_grpc.FaceSwapServicer):
    """A FaceSwap counterpart whose ListModels fails UNAVAILABLE `failures` times (with `trailers`), then answers."""

    def __init__(self, failures: int, trailers: tuple = ()):
        self.failures, self.trailers, self.calls = failures, trailers, 0

    async def ListModels(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            context.set_trailing_metadata(self.trailers)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the replica went away")
        return pb.ListModelsResponse(models=[pb.ModelInfo(name="after-retry")])


def _serve(servicer) -> tuple[str, asyncio.AbstractEventLoop, threading.Thread, "grpc.aio.Server"]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server = grpc.aio.server()
        pb_grpc.add_FaceSwapServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    return f"127.0.0.1:{port}", loop, thread, server


@pytest.mark.parametrize("client_class", [Client, AsyncClient])
@pytest.mark.parametrize(("failures", "trailers", "answered"), [
    (1, (), True),  # a replica that went away: sent again
    (5, (), False),  # three attempts in all, then the error
    (1, (("grpc-retry-pushback-ms", "-1"),), False),  # the server says a retry cannot help: not sent again
], ids=["retried", "gives-up", "pushback"])
def test_unary_calls_are_sent_again_when_unavailable_unless_the_server_says_not_to(client_class, failures, trailers,
                                                                                    answered):
    servicer = FlakyServicer(failures, trailers)
    address, loop, thread, server = _serve(servicer)
    try:
        async def call_async():
            async with AsyncClient(address, timeout=20) as c:
                return await c.list_models()

        def call():
            if client_class is AsyncClient:
                return asyncio.run(call_async())
            with Client(address, timeout=20) as c:
                return c.list_models()

        if answered:
            assert [m.name for m in call()] == ["after-retry"]
        else:
            with pytest.raises(UnavailableError, match="went away"):
                call()
        assert servicer.calls == {"retried": 2, "gives-up": 3, "pushback": 1}[
            "retried" if answered else "pushback" if trailers else "gives-up"]
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_closed_client_refuses_calls():
    c = Client(UNREACHABLE)
    c.close()
    c.close()  # idempotent
    with pytest.raises(CancelledError, match="closed; create a new one"):
        c.list_models()


# ---------------------------------------------------------------- sync, real server


def test_list_models(client, served_model):
    models = client.list_models()
    assert [m.name for m in models] == [served_model.model]
    info = models[0]
    assert isinstance(info, ModelInfo)
    assert info.identities == served_model.identities
    assert info.resolution == served_model.resolution
    assert info.status == "ready" and info.ready and info.error == ""
    assert info.backend and len(info.manifest_sha256) == 64


def test_swap_rgb_and_bgr_agree(client, pair, served_model):
    face, target = pair
    rgb = client.swap(face, served_model.model, target, color="rgb", return_mask=True, frame_id=7)
    bgr = client.swap(np.ascontiguousarray(face[:, :, ::-1]), served_model.model, target, color="bgr")
    r = served_model.resolution
    assert rgb.image.shape == (r, r, 3) and rgb.image.dtype == np.uint8
    assert rgb.mask.shape == (r, r) and rgb.mask.dtype == np.uint8
    assert rgb.frame_id == 7 and not rgb.dropped and rgb.encoded is None
    assert rgb.timings.total_ms > 0 and rgb.timings.batch_size >= 1
    assert_close(bgr.image, rgb.image[:, :, ::-1])
    assert bgr.mask is None  # not asked for
    assert not np.array_equal(rgb.image, face)  # the model changed the face


def test_swap_png_and_jpeg_transport(client, pair, served_model):
    face, target = pair
    raw = client.swap(face, served_model.model, target, color="rgb", return_mask=True)
    png = client.swap(face, served_model.model, target, color="rgb", encoding="png", return_mask=True)
    assert png.image is None and png.mask is None
    assert png.encoded.startswith(b"\x89PNG") and png.encoded_mask.startswith(b"\x89PNG")
    decoded = cv2.imdecode(np.frombuffer(png.encoded, np.uint8), cv2.IMREAD_COLOR)  # BGR
    assert_close(decoded[:, :, ::-1], raw.image)  # PNG is lossless
    mask = cv2.imdecode(np.frombuffer(png.encoded_mask, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert_close(mask, raw.mask)
    jpeg = client.swap(face, served_model.model, target, color="rgb", encoding="jpeg", jpeg_quality=95)
    assert jpeg.image is None and jpeg.encoded.startswith(b"\xff\xd8\xff")
    decoded = cv2.imdecode(np.frombuffer(jpeg.encoded, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == raw.image.shape
    assert np.abs(decoded[:, :, ::-1].astype(np.int16) - raw.image).mean() < 12  # lossy but close


def test_swap_encoded_input_and_other_sizes(client, pair, served_model):
    face, target = pair
    raw = client.swap(face, served_model.model, target, color="rgb")
    ok, png = cv2.imencode(".png", face[:, :, ::-1])
    from_png = client.swap(png.tobytes(), served_model.model, target, color="rgb")
    assert_close(from_png.image, raw.image)
    r = served_model.resolution
    big = cv2.resize(face, (2 * r, 2 * r), interpolation=cv2.INTER_CUBIC)
    assert client.swap(big, served_model.model, target, color="rgb").image.shape == (2 * r, 2 * r, 3)


def test_swap_errors(client, pair, served_model):
    face, target = pair
    with pytest.raises(NotFoundError):
        client.swap(face, "no-such-model", target, color="rgb")
    with pytest.raises(NotFoundError):
        client.swap(face, served_model.model, "no-such-identity", color="rgb")
    corrupt_png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64  # passes the local magic check, fails to decode
    with pytest.raises(InvalidInputError):
        client.swap(corrupt_png, served_model.model, target, color="rgb")
    # gRPC's deadline is a timer: an aligned face answered within a millisecond can beat even a microsecond's
    # deadline. Searching a 2048x2048 frame for faces takes far longer than the 1 ms given.
    slow = np.zeros((2048, 2048, 3), np.uint8)
    with pytest.raises(DeadlineExceededError):
        client.swap(slow, served_model.model, target, color="rgb", faces="largest", timeout=1e-3)
    with Client(served_model.address, timeout=1e-3) as impatient:  # the client default applies too
        with pytest.raises(DeadlineExceededError):
            impatient.swap(slow, served_model.model, target, color="rgb", faces="largest")
    assert client.list_models()  # the client is still usable after failures


def test_stream_in_order_with_flow_control(client, served_model):
    source, target = served_model.identities
    faces = list(itertools.islice(itertools.cycle(served_model.sample_faces[source]), 20))
    pulled = 0

    def frames():
        nonlocal pulled
        for face in faces:
            pulled += 1
            yield face

    max_in_flight = 2
    results = []
    for result in client.stream(frames(), served_model.model, target, color="rgb", max_in_flight=max_in_flight,
                                return_mask=True):
        # The SDK pulls a frame only when a slot is free: never more than max_in_flight ahead of results.
        assert pulled <= result.frame_id + 1 + max_in_flight
        results.append(result)
    assert [r.frame_id for r in results] == list(range(20))
    served = [r for r in results if not r.dropped]
    assert len(served) >= 10, "the server dropped most frames of a slow, flow-controlled stream"
    for r in results:
        if r.dropped:
            assert r.image is None
        else:
            assert r.mask.shape == faces[r.frame_id].shape[:2]
    for r in served[:3]:
        assert_close(r.image, client.swap(faces[r.frame_id], served_model.model, target, color="rgb").image)


def test_stream_bgr_and_early_exit(client, pair, served_model):
    face, target = pair
    bgr = np.ascontiguousarray(face[:, :, ::-1])
    expected = client.swap(face, served_model.model, target, color="rgb").image[:, :, ::-1]
    for result in client.stream(itertools.repeat(bgr), served_model.model, target, color="bgr"):
        if not result.dropped:
            assert_close(result.image, expected)
        if result.frame_id == 4:
            break  # an endless source: leaving the loop must cancel the call
    assert client.list_models()


def test_stream_errors(client, pair, served_model):
    face, target = pair
    with pytest.raises(NotFoundError):
        list(client.stream([face] * 3, served_model.model, "no-such-identity", color="rgb"))
    received = []
    with pytest.raises(InvalidInputError, match="INVALID_ARGUMENT: frame 2: .*uint8"):
        for result in client.stream([face, face, face.astype(np.float32)], served_model.model, target, color="rgb"):
            received.append(result.frame_id)
    assert received == [0, 1]  # frames before the bad one still come back


def test_an_async_call_cut_off_by_close_raises_cancelled_error(served_model, pair):
    """Not asyncio.CancelledError: that one means the caller's own task was cancelled, and escapes
    `except FaceTwinError`."""
    face, target = pair

    async def main() -> list[str]:
        client = AsyncClient(served_model.address)

        async def consume():
            async for _ in client.stream(itertools.repeat(face), served_model.model, target, color="rgb"):
                pass

        async def swaps():
            while True:
                await client.swap(face, served_model.model, target, color="rgb")

        tasks = [asyncio.create_task(consume()), asyncio.create_task(swaps())]
        await asyncio.sleep(0.5)
        await client.close()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        return [type(outcome).__module__ + "." + type(outcome).__name__ for outcome in outcomes]

    assert asyncio.run(main()) == ["facetwin.client.errors.CancelledError"] * 2


def test_a_message_over_the_servers_limit_says_where_the_limit_is(client, served_model):
    big = np.zeros((2400, 2400, 3), np.uint8)  # 17 MB raw: under this client's 64 MiB, over the server's 16 MiB
    with pytest.raises(ResourceExhaustedError, match="max_message_bytes"):
        client.swap(big, served_model.model, served_model.identities[1], color="rgb")


def test_a_call_cut_off_by_close_raises_cancelled_error(served_model, pair):
    face, target = pair
    client = Client(served_model.address)
    failures: list[BaseException] = []

    def consume():
        try:
            for _ in client.stream(itertools.repeat(face), served_model.model, target, color="rgb"):
                pass
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(0.5)
    client.close()
    thread.join(30)
    assert len(failures) == 1 and isinstance(failures[0], CancelledError), failures


class SlowSource:
    """A frame source (think cv2.VideoCapture) whose reads take a while, and that says whether one is under way."""

    def __init__(self, face: np.ndarray, read_s: float) -> None:
        self.face, self.read_s, self.reading, self.reads = face, read_s, threading.Event(), 0

    def __iter__(self) -> "SlowSource":
        return self

    def __next__(self) -> np.ndarray:
        self.reading.set()
        try:
            time.sleep(self.read_s)
            self.reads += 1
            return self.face
        finally:
            self.reading.clear()


@pytest.mark.parametrize("stop", ["error", "break"])
def test_when_a_stream_ends_its_frame_source_is_no_longer_being_read(client, pair, served_model, stop):
    """The SDK pulls `frames` on a gRPC thread. Once stream() has raised, or the caller has left the loop, that thread
    must be out of the source, so the caller may close it at once (releasing a cv2.VideoCapture that another thread
    is reading can hang the process)."""
    face, target = pair
    for attempt in range(5):  # each time, the error or the break lands while the gRPC thread waits in a read
        source = SlowSource(face, read_s=0.05 * (attempt + 1))
        if stop == "error":
            with pytest.raises(NotFoundError, match="^NOT_FOUND: frame 0: "):  # says the frame it ended on
                for _ in client.stream(source, served_model.model, "no-such-identity", color="rgb"):
                    pass
        else:
            for result in client.stream(source, served_model.model, target, color="rgb"):
                if result.frame_id == 2:
                    break
        assert not source.reading.is_set(), f"still reading after the stream ended (attempt {attempt})"
        reads = source.reads
        time.sleep(source.read_s * 3)
        assert source.reads == reads, "the source was read again after the stream ended"
    assert client.list_models()


# ---------------------------------------------------------------- asyncio, real server


async def test_async_list_models_and_swap(served_model, pair):
    face, target = pair
    async with AsyncClient(served_model.address) as c:
        models = await c.list_models()
        assert [m.name for m in models] == [served_model.model]
        rgb = await c.swap(face, served_model.model, target, color="rgb", return_mask=True)
        bgr = await c.swap(np.ascontiguousarray(face[:, :, ::-1]), served_model.model, target, color="bgr")
        assert_close(bgr.image, rgb.image[:, :, ::-1])
        assert rgb.mask.shape == face.shape[:2]
        png = await c.swap(face, served_model.model, target, color="rgb", encoding="png")
        assert png.image is None and png.encoded.startswith(b"\x89PNG")
        with pytest.raises(NotFoundError):
            await c.swap(face, "no-such-model", target, color="rgb")
        with pytest.raises(NotFoundError):
            await c.swap(face, served_model.model, "no-such-identity", color="rgb")
        with pytest.raises(InvalidInputError):
            await c.swap(b"\xff\xd8\xff" + b"\x00" * 64, served_model.model, target, color="rgb")
        # A 2048x2048 frame to search for faces (see test_swap_errors).
        with pytest.raises(DeadlineExceededError):
            await c.swap(np.zeros((2048, 2048, 3), np.uint8), served_model.model, target, color="rgb",
                         faces="largest", timeout=1e-3)


async def test_async_stream_sync_and_async_sources(served_model):
    source, target = served_model.identities
    faces = list(itertools.islice(itertools.cycle(served_model.sample_faces[source]), 20))
    pulled = 0

    async def frames():
        nonlocal pulled
        for face in faces:
            pulled += 1
            yield face

    async with AsyncClient(served_model.address) as c:
        results = []
        async for result in c.stream(frames(), served_model.model, target, color="rgb", max_in_flight=3):
            assert pulled <= result.frame_id + 1 + 3
            results.append(result)
        assert [r.frame_id for r in results] == list(range(20))
        assert all(r.image.shape == faces[0].shape for r in results if not r.dropped)
        ids = [r.frame_id async for r in c.stream(faces[:5], served_model.model, target, color="rgb")]
        assert ids == [0, 1, 2, 3, 4]
        with pytest.raises(NotFoundError):
            async for _ in c.stream(faces[:3], served_model.model, "no-such-identity", color="rgb"):
                pass
        received = []
        with pytest.raises(InvalidInputError):
            async for result in c.stream([faces[0], "not an image"], served_model.model, target, color="rgb"):
                received.append(result.frame_id)
        assert received == [0]


def test_stream_latest_policy_answers_every_frame(served_model):
    from facetwin.client import Client

    a, b = served_model.identities[:2]
    face = np.ascontiguousarray(np.tile(served_model.sample_faces[a][0], (24, 24, 1)))
    with Client(served_model.address) as client:
        results = list(client.stream([face] * 30, served_model.model, b, color="rgb", policy="latest",
                                     max_in_flight=64, timeout=120))
    assert [r.frame_id for r in results] == list(range(30))
    assert not results[-1].dropped and results[-1].image.shape == face.shape
    assert all(r.image is None for r in results if r.dropped)


def test_stream_rejects_unknown_policy(served_model):
    from facetwin.client import Client, InvalidInputError

    a, b = served_model.identities[:2]
    with Client(served_model.address) as client, pytest.raises(InvalidInputError, match="policy"):
        list(client.stream([served_model.sample_faces[a][0]], served_model.model, b, color="rgb", policy="fast"))


def test_results_say_which_weights_made_them(client, pair, served_model):
    from facetwin.core.bundle import manifest_sha256

    face, target = pair
    result = client.swap(face, served_model.model, target, color="rgb")
    assert result.provenance.synthetic and "trainedAlgorithmicMedia" in result.provenance.digital_source_type
    assert (result.provenance.model, result.provenance.target) == (served_model.model, target)
    assert result.provenance.manifest_sha256 == manifest_sha256(served_model.model_dir / served_model.model)
    assert len(result.request_id) >= 16

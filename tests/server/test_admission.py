"""Limits before work, through a real server over loopback: streams that push back instead of failing, per-client
stream and call limits, the idle-stream timeout."""

from __future__ import annotations

import concurrent.futures
import threading

import grpc
import pytest

from facetwin.server.auth import peer_host
from facetwin.server.config import ServerConfig
from facetwin.server.errors import ResourceExhaustedError
from facetwin.server.limits import Admission, AdmissionLimits
from facetwin.v1 import facetwin_pb2 as pb
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc
from tests.conftest import ServerThread
from tests.server.test_service import raw_request


@pytest.fixture(scope="module")
def tight_server(tiny_model_dir):
    """A server with small queues, windows and limits, so that the limits are reached by a handful of callers."""
    config = ServerConfig(address="127.0.0.1:0", model_dir=str(tiny_model_dir), max_queue=4, stream_window=4,
                          max_streams_per_client=3, max_calls_per_client=64, stream_idle_timeout_s=1.0, grace_s=1.0)
    server = ServerThread(config)
    yield server
    server.stop()


def _frames(served_model, count: int, policy=pb.STREAM_POLICY_QUEUE):
    a, b = served_model.identities[:2]
    face = served_model.sample_faces[a][0]
    for i in range(count):
        yield pb.SwapStreamRequest(request=raw_request(face, served_model.model, b, frame_id=i),
                                   policy=policy if i == 0 else pb.STREAM_POLICY_UNSPECIFIED)


def test_streams_sharing_a_model_push_back_instead_of_failing(tight_server, served_model):
    """Three streams, each sending as fast as the server reads, against a queue of 4: every frame is swapped."""
    with grpc.insecure_channel(tight_server.address) as channel:
        stub = pb_grpc.FaceSwapStub(channel)

        def one_stream(_):
            replies = list(stub.SwapStream(_frames(served_model, 60), timeout=120))
            return [(r.response.frame_id, r.status) for r in replies]

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            results = list(pool.map(one_stream, range(3)))
    for replies in results:
        assert replies == [(i, pb.FRAME_STATUS_OK) for i in range(60)]


def test_a_client_over_its_stream_limit_is_refused_before_any_frame_is_read(tight_server, served_model):
    release = threading.Event()

    def held_open():  # one frame, then nothing until released: the stream stays open
        yield next(_frames(served_model, 1))
        release.wait(30)

    with grpc.insecure_channel(tight_server.address) as channel:
        stub = pb_grpc.FaceSwapStub(channel)
        open_streams = [stub.SwapStream(held_open(), timeout=60) for _ in range(3)]
        for call in open_streams:
            assert next(call).status == pb.FRAME_STATUS_OK  # all three are open and answering
        with pytest.raises(grpc.RpcError) as info:
            list(stub.SwapStream(_frames(served_model, 1), timeout=30))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "streams open" in info.value.details()
        release.set()
        for call in open_streams:
            list(call)  # the server answered everything; each ends cleanly
        replies = list(stub.SwapStream(_frames(served_model, 2), timeout=30))  # the slots are free again
        assert [r.status for r in replies] == [pb.FRAME_STATUS_OK] * 2


def test_an_idle_stream_ends_with_deadline_exceeded_after_its_answers(tight_server, served_model):
    release = threading.Event()

    def two_then_silence():
        yield from _frames(served_model, 2)
        release.wait(30)

    with grpc.insecure_channel(tight_server.address) as channel:
        call = pb_grpc.FaceSwapStub(channel).SwapStream(two_then_silence(), timeout=60)
        answers = []
        with pytest.raises(grpc.RpcError) as info:
            for reply in call:
                answers.append(reply.response.frame_id)
        release.set()
    assert answers == [0, 1]
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "no frame for 1 s" in info.value.details()


def test_admission_counts_per_client_and_in_total():
    admission = Admission(AdmissionLimits(calls_per_client=2, streams_per_client=1, calls=3, streams=0))
    with admission.admit("call", "a"), admission.admit("call", "a"):
        with pytest.raises(ResourceExhaustedError, match="this client already has 2 unary calls"):
            with admission.admit("call", "a"):
                pass
        with admission.admit("call", "b"):
            with pytest.raises(ResourceExhaustedError, match="the server has 3 unary calls open"):
                with admission.admit("call", "c"):
                    pass
        with admission.admit("stream", "a"):
            with pytest.raises(ResourceExhaustedError, match="1 streams open"):
                with admission.admit("stream", "a"):
                    pass
    assert admission.open("call") == 0 and admission.open("stream") == 0  # every slot given back


def test_peer_host_drops_the_port():
    assert peer_host("ipv4:10.0.0.7:53211") == "10.0.0.7"
    assert peer_host("ipv6:[::1]:53211") == "::1"
    assert peer_host("unix:/run/facetwin.sock") == "unix:/run/facetwin.sock"


def test_an_answer_over_the_message_limit_is_refused_before_the_work(tiny_model_dir, served_model):
    """A raw answer's size is known from the image: over the message limit it is RESOURCE_EXHAUSTED before the swap,
    with what to ask for instead; in a stream only that frame fails."""
    import cv2

    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(tiny_model_dir), max_message_mb=1,
                                       grace_s=1.0))
    a, b = served_model.identities[:2]
    face = served_model.sample_faces[a][0]
    big = cv2.resize(face, (700, 700))  # 1.47 MB raw out, from a PNG of a few hundred KB
    png = cv2.imencode(".png", big[..., ::-1])[1].tobytes()
    assert len(png) < 900_000
    big_raw = pb.SwapRequest(model=served_model.model, target=b, image=pb.Image(encoded=png),
                             output_encoding=pb.ENCODING_RAW)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.FaceSwapStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.Swap(big_raw, timeout=60)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "PNG or JPEG output" in error.value.details() and "1470000 bytes" in error.value.details()
            # Refused from the header alone: these pixels are never decoded (they would be found broken).
            broken = pb.SwapRequest(model=served_model.model, target=b, image=pb.Image(encoded=png[:len(png) // 2]),
                                    output_encoding=pb.ENCODING_RAW)
            with pytest.raises(grpc.RpcError) as error:
                stub.Swap(broken, timeout=60)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "1470000 bytes" in error.value.details()
            as_png = stub.Swap(pb.SwapRequest(model=served_model.model, target=b, image=pb.Image(encoded=png),
                                              output_encoding=pb.ENCODING_JPEG), timeout=60)
            assert as_png.image.encoded[:2] == b"\xff\xd8"  # what the message advised fits

            def frames():
                big_raw.frame_id = 0
                yield pb.SwapStreamRequest(request=big_raw)
                yield pb.SwapStreamRequest(request=raw_request(face, served_model.model, b, frame_id=1))

            replies = list(stub.SwapStream(frames(), timeout=60))
    finally:
        server.stop()
    assert [(r.response.frame_id, r.status) for r in replies] == [(0, pb.FRAME_STATUS_ERROR), (1, pb.FRAME_STATUS_OK)]
    assert replies[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


def test_a_full_queue_refuses_a_call_before_its_image_is_decoded(tiny_model_dir, served_model):
    """While flooding callers keep the queue full, a call whose image is broken is refused for the queue
    (RESOURCE_EXHAUSTED), not for its image: the queue is checked before the image is decoded or searched."""
    config = ServerConfig(address="127.0.0.1:0", model_dir=str(tiny_model_dir), max_queue=1, max_batch=1,
                          inference_workers=1, max_calls_per_client=0, max_calls=0, grace_s=1.0)
    server = ServerThread(config)
    a, b = served_model.identities[:2]
    good = raw_request(served_model.sample_faces[a][0], served_model.model, b)
    broken = pb.SwapRequest(model=served_model.model, target=b, kind=pb.IMAGE_KIND_FULL_FRAME,
                            image=pb.Image(encoded=b"\x89PNG\r\n\x1a\n" + b"\0" * 64))
    stop = threading.Event()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.FaceSwapStub(channel)

            def flood():
                while not stop.is_set():
                    try:
                        stub.Swap(good, timeout=30)
                    except grpc.RpcError:
                        pass

            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                for _ in range(6):
                    pool.submit(flood)
                codes = set()
                for _ in range(200):
                    try:
                        stub.Swap(broken, timeout=30)
                    except grpc.RpcError as exc:
                        codes.add(exc.code())
                    if grpc.StatusCode.RESOURCE_EXHAUSTED in codes:
                        break
                stop.set()
    finally:
        stop.set()
        server.stop()
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes

"""The real server over loopback gRPC: contract, health, reflection, and every bad input a caller can send."""

from __future__ import annotations

import concurrent.futures

import cv2
import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from facetwin.core.bundle import load_manifest
from facetwin.v1 import facetwin_pb2 as pb
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def channel(served_model):
    with grpc.insecure_channel(served_model.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.FaceSwapStub(channel)


def raw_request(face: np.ndarray, model: str, target: str, **kwargs) -> pb.SwapRequest:
    h, w, c = face.shape
    return pb.SwapRequest(model=model, target=target, image=pb.Image(raw=pb.RawImage(
        pixels=face.tobytes(), height=h, width=w, channels=c, color_order=pb.COLOR_ORDER_RGB)), **kwargs)


def raw_to_array(image: pb.Image) -> np.ndarray:
    r = image.raw
    return np.frombuffer(r.pixels, np.uint8).reshape(r.height, r.width, r.channels)


def direct_onnx(model_dir, model, target, face):
    """What the bundle's graph computes for one face, without the server (the reference the server must match)."""
    manifest = load_manifest(model_dir / model)
    session = ort.InferenceSession(str(model_dir / model / manifest.targets[target]), providers=["CPUExecutionProvider"])
    x = face.astype(np.float32).transpose(2, 0, 1)[None] / 255.0
    swapped, mask = session.run(None, {manifest.input.name: x})
    return np.clip(swapped[0].transpose(1, 2, 0) * 255 + 0.5, 0, 255).astype(np.uint8), mask


def assert_still_serving(stub, served_model):
    a, b = served_model.identities[:2]
    reply = stub.Swap(raw_request(served_model.sample_faces[a][0], served_model.model, b), timeout=30)
    assert reply.image.raw.height == served_model.resolution


def test_health_is_serving_for_server_and_service(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "facetwin.v1.FaceSwap"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"facetwin.v1.FaceSwap", "grpc.health.v1.Health"} <= names


def test_list_models(stub, served_model):
    (info,) = stub.ListModels(pb.ListModelsRequest()).models
    assert info.name == served_model.model
    assert tuple(info.identities) == served_model.identities
    assert info.resolution == served_model.resolution
    assert info.backend == "onnxruntime" and info.status == pb.MODEL_STATUS_READY
    assert info.variant == "ae" and len(info.manifest_sha256) == 64


def test_unary_swap_matches_the_bundle_graph(stub, served_model):
    a, b = served_model.identities[:2]
    face = served_model.sample_faces[a][0]
    reply = stub.Swap(raw_request(face, served_model.model, b, return_mask=True, frame_id=7))
    swapped = raw_to_array(reply.image)
    expected, mask = direct_onnx(served_model.model_dir, served_model.model, b, face)
    assert np.abs(swapped.astype(int) - expected).max() <= 1
    assert reply.frame_id == 7 and reply.image.raw.color_order == pb.COLOR_ORDER_RGB
    served_mask = raw_to_array(reply.mask)
    assert served_mask.shape == (*face.shape[:2], 1)
    assert np.abs(served_mask[..., 0].astype(int) - np.round(mask[0, 0] * 255)).max() <= 1
    t = reply.timings
    assert t.total_ms >= t.inference_ms > 0 and t.batch_size >= 1


def test_bgr_in_bgr_out_is_the_mirror_of_rgb(stub, served_model):
    a, b = served_model.identities[:2]
    face = served_model.sample_faces[a][1]
    rgb = raw_to_array(stub.Swap(raw_request(face, served_model.model, b)).image)
    bgr_face = np.ascontiguousarray(face[:, :, ::-1])
    request = raw_request(bgr_face, served_model.model, b)
    request.image.raw.color_order = pb.COLOR_ORDER_BGR
    reply = stub.Swap(request)
    assert reply.image.raw.color_order == pb.COLOR_ORDER_BGR
    np.testing.assert_array_equal(raw_to_array(reply.image), rgb[:, :, ::-1])


def test_encoded_in_png_and_jpeg_out_at_the_callers_size(stub, served_model):
    a, b = served_model.identities[:2]
    face = cv2.resize(served_model.sample_faces[a][2], (80, 80), interpolation=cv2.INTER_CUBIC)
    ok, png = cv2.imencode(".png", face[:, :, ::-1])
    png_reply = stub.Swap(pb.SwapRequest(model=served_model.model, target=b, image=pb.Image(encoded=png.tobytes())))
    decoded = cv2.imdecode(np.frombuffer(png_reply.image.encoded, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (80, 80, 3)
    jpeg_reply = stub.Swap(pb.SwapRequest(model=served_model.model, target=b, image=pb.Image(encoded=png.tobytes()),
                                          output_encoding=pb.ENCODING_JPEG, jpeg_quality=80))
    assert jpeg_reply.image.encoded[:2] == b"\xff\xd8"


def test_stream_answers_in_order_with_frame_ids(stub, served_model):
    a, b = served_model.identities[:2]
    faces = (served_model.sample_faces[a] * 2)[:20]
    requests = (pb.SwapStreamRequest(request=raw_request(f, served_model.model, b, frame_id=100 + i))
                for i, f in enumerate(faces))
    replies = list(stub.SwapStream(requests, timeout=60))
    assert [r.response.frame_id for r in replies] == list(range(100, 120))
    assert all(r.status == pb.FRAME_STATUS_OK for r in replies)
    for face, reply in zip(faces[:3], replies):
        expected, _ = direct_onnx(served_model.model_dir, served_model.model, b, face)
        assert np.abs(raw_to_array(reply.response.image).astype(int) - expected).max() <= 1


def test_concurrent_callers_are_batched_together(stub, served_model):
    a, b = served_model.identities[:2]
    face = served_model.sample_faces[a][0]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: stub.Swap(raw_request(face, served_model.model, b), timeout=30), range(64)))
    outputs = {raw_to_array(r.image).tobytes() for r in replies}
    assert len(outputs) == 1  # same input, same answer, whatever batch it rode in
    assert max(r.timings.batch_size for r in replies) > 1


# --- bad input: the right status code, an actionable message, and the server keeps serving ---------------------


def _bad_requests(m):
    a, b = m.identities[:2]
    face = m.sample_faces[a][0]
    h, w, _ = face.shape

    def raw(**fields):
        base = dict(pixels=face.tobytes(), height=h, width=w, channels=3)
        base.update(fields)
        return pb.SwapRequest(model=m.model, target=b, image=pb.Image(raw=pb.RawImage(**base)))

    return {
        "corrupt bytes": (pb.SwapRequest(model=m.model, target=b, image=pb.Image(encoded=b"\x89PNG garbage")),
                          grpc.StatusCode.INVALID_ARGUMENT, "is not a JPEG or PNG file"),
        "wrong shape": (raw(height=h + 1), grpc.StatusCode.INVALID_ARGUMENT, "height*width*channels"),
        "wrong channels": (raw(pixels=face.tobytes() + bytes(h * w), channels=4), grpc.StatusCode.INVALID_ARGUMENT,
                           "channels is 4"),
        "wrong dtype": (raw(pixel_type=pb.PIXEL_TYPE_FLOAT32), grpc.StatusCode.INVALID_ARGUMENT, "PIXEL_TYPE_UINT8"),
        "no image": (pb.SwapRequest(model=m.model, target=b), grpc.StatusCode.INVALID_ARGUMENT, "image is empty"),
        "unknown model": (pb.SwapRequest(model="nope", target=b, image=pb.Image(encoded=b"x")),
                          grpc.StatusCode.NOT_FOUND, "loaded models: ['tiny']"),
        "unknown identity": (pb.SwapRequest(model=m.model, target="zed", image=pb.Image(encoded=b"x")),
                             grpc.StatusCode.NOT_FOUND, "choose one of"),
        "path in model name": (pb.SwapRequest(model="../tiny", target=b, image=pb.Image(encoded=b"x")),
                               grpc.StatusCode.INVALID_ARGUMENT, "is not valid"),
        "path in identity": (pb.SwapRequest(model=m.model, target="../" + b, image=pb.Image(encoded=b"x")),
                             grpc.StatusCode.INVALID_ARGUMENT, "target identity '../"),
        "huge side": (raw(pixels=bytes(5000 * 9 * 3), height=5000, width=9), grpc.StatusCode.RESOURCE_EXHAUSTED,
                      "at most 4096"),
        "faces on a crop": (pb.SwapRequest(model=m.model, target=b, image=raw().image, faces=pb.FACE_SELECTION_ALL),
                            grpc.StatusCode.INVALID_ARGUMENT, "an aligned face is one face"),
        "oblong crop": (raw(pixels=bytes(h * (w + 8) * 3), width=w + 8), grpc.StatusCode.INVALID_ARGUMENT,
                        f"the image is {w + 8}x{h}, but an aligned face is a square crop"),
        # the bytes are the caller's mistake, not the size they were meant to have
        "huge claim": (raw(pixels=bytes(12), height=2**31, width=2**31), grpc.StatusCode.INVALID_ARGUMENT,
                       "holds 12 bytes"),
        "full frame": (pb.SwapRequest(model=m.model, target=b, image=pb.Image(encoded=b"x"),
                                      kind=pb.IMAGE_KIND_FULL_FRAME), grpc.StatusCode.INVALID_ARGUMENT,
                       "is not a JPEG or PNG file"),
    }


@pytest.mark.parametrize("case", ["corrupt bytes", "wrong shape", "wrong channels", "wrong dtype", "no image",
                                  "unknown model", "unknown identity", "path in model name", "huge side", "huge claim",
                                  "full frame", "faces on a crop", "oblong crop"])
def test_bad_unary_input(stub, served_model, case):
    request, code, message = _bad_requests(served_model)[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.Swap(request, timeout=30)
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details()
    assert_still_serving(stub, served_model)


def test_oversize_message_is_resource_exhausted(stub, served_model):
    _, b = served_model.identities[:2]
    huge = pb.SwapRequest(model=served_model.model, target=b, image=pb.Image(encoded=bytes(17 * 1024 * 1024)))
    with pytest.raises(grpc.RpcError) as info:
        stub.Swap(huge, timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_still_serving(stub, served_model)


def test_empty_stream_is_invalid_argument(stub, served_model):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.SwapStream(iter([]), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no frames" in info.value.details()
    assert_still_serving(stub, served_model)


def test_a_bad_frame_gets_its_own_error_and_the_stream_goes_on(stub, served_model):
    a, b = served_model.identities[:2]
    face = served_model.sample_faces[a][0]
    requests = [pb.SwapStreamRequest(request=raw_request(face, served_model.model, b, frame_id=i)) for i in range(6)]
    requests[3].request.image.raw.height = 20  # frame 3 lies about its shape
    requests[4].request.target = "nobody"  # frame 4 names an identity the model lacks
    replies = list(stub.SwapStream(iter(requests), timeout=30))
    assert [r.response.frame_id for r in replies] == list(range(6))
    assert [r.status for r in replies] == [pb.FRAME_STATUS_OK] * 3 + [pb.FRAME_STATUS_ERROR] * 2 + [pb.FRAME_STATUS_OK]
    assert replies[3].error.code_name == "INVALID_ARGUMENT" and replies[3].error.code == 3
    assert "image.raw.pixels holds" in replies[3].error.message and not replies[3].response.HasField("image")
    assert replies[4].error.code_name == "NOT_FOUND" and "'nobody'" in replies[4].error.message
    np.testing.assert_array_equal(raw_to_array(replies[5].response.image), raw_to_array(replies[0].response.image))
    assert_still_serving(stub, served_model)


def test_a_settings_only_stream_message_says_where_the_settings_go(stub, served_model):
    a, b = served_model.identities[:2]
    settings = pb.SwapStreamRequest(policy=pb.STREAM_POLICY_LATEST)  # a "configure first" message, no frame
    frame = pb.SwapStreamRequest(request=raw_request(served_model.sample_faces[a][0], served_model.model, b,
                                                     frame_id=1))
    replies = list(stub.SwapStream(iter([settings, frame]), timeout=30))
    assert [r.status for r in replies] == [pb.FRAME_STATUS_ERROR, pb.FRAME_STATUS_OK]
    assert replies[0].error.code_name == "INVALID_ARGUMENT"
    assert "carries no frame" in replies[0].error.message and "on its first frame's message" in replies[0].error.message


def test_malformed_protobuf_is_invalid_argument_not_unknown(channel, served_model):
    swap = channel.unary_unary("/facetwin.v1.FaceSwap/Swap", request_serializer=None, response_deserializer=None)
    for garbage in (b"\xff\xff\xff", b"\x0a\x05\xff\xfe\xfd\xfc\xfb"):  # a broken tag; invalid UTF-8 in `model`
        with pytest.raises(grpc.RpcError) as info:
            swap(garbage, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "not a valid SwapRequest" in info.value.details()
    stream = channel.stream_stream("/facetwin.v1.FaceSwap/SwapStream", request_serializer=None,
                                   response_deserializer=pb.SwapStreamResponse.FromString)
    a, b = served_model.identities[:2]
    good = pb.SwapStreamRequest(request=raw_request(served_model.sample_faces[a][0], served_model.model, b,
                                                    frame_id=7)).SerializeToString()
    replies = list(stream(iter([good, b"\xff\xff\xff", good]), timeout=30))
    assert [r.status for r in replies] == [pb.FRAME_STATUS_OK, pb.FRAME_STATUS_ERROR, pb.FRAME_STATUS_OK]
    assert "stream message 1 is not a valid SwapStreamRequest" in replies[1].error.message
    assert_still_serving(stub=pb_grpc.FaceSwapStub(channel), served_model=served_model)


def test_unknown_stream_policy_and_long_names_are_invalid_argument(stub, served_model):
    a, b = served_model.identities[:2]
    face = served_model.sample_faces[a][0]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.SwapStream(iter([pb.SwapStreamRequest(request=raw_request(face, served_model.model, b),
                                                        policy=99)]), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "policy" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.Swap(raw_request(face, "m" * 10_000, b), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(info.value.details()) < 300 and "10000 characters" in info.value.details()


def test_expired_deadline_does_not_disturb_others(stub, served_model):
    a, b = served_model.identities[:2]
    # A 4096x4096 PNG is small on the wire but takes far longer than 20 ms to decode and swap.
    ok, png = cv2.imencode(".png", np.zeros((4096, 4096, 3), np.uint8))
    request = pb.SwapRequest(model=served_model.model, target=b, image=pb.Image(encoded=png.tobytes()),
                             output_encoding=pb.ENCODING_PNG)
    with pytest.raises(grpc.RpcError) as info:
        stub.Swap(request, timeout=0.02)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_still_serving(stub, served_model)


def test_latest_policy_answers_every_frame_in_order(stub, served_model):
    a, b = served_model.identities[:2]
    big = np.ascontiguousarray(np.tile(served_model.sample_faces[a][0], (24, 24, 1)))  # slow to decode and shrink
    requests = [pb.SwapStreamRequest(request=raw_request(big, served_model.model, b, frame_id=i),
                                     policy=pb.STREAM_POLICY_LATEST) for i in range(40)]
    replies = list(stub.SwapStream(iter(requests), timeout=120))
    assert [r.response.frame_id for r in replies] == list(range(40))
    assert replies[-1].status == pb.FRAME_STATUS_OK
    for reply in replies:
        if reply.status == pb.FRAME_STATUS_DROPPED:
            assert not reply.response.HasField("image")
        else:
            assert reply.status == pb.FRAME_STATUS_OK and reply.response.image.raw.height == big.shape[0]


def test_server_info_tells_a_caller_every_limit_in_force(stub, served_model):
    from facetwin.server.config import ServerConfig

    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    config = ServerConfig()  # the fixture's server changes none of these
    assert info.version and not info.auth_required and not info.tls
    assert info.default_stream_policy == pb.STREAM_POLICY_QUEUE
    assert info.limits.max_image_side == config.max_image_side
    assert info.limits.max_image_pixels == config.max_image_pixels
    assert info.limits.max_message_bytes == config.max_message_mb * 1024 * 1024
    assert list(info.limits.image_formats) == ["jpeg", "png"]
    assert info.limits.stream_window == config.stream_window and info.limits.max_queue == config.max_queue
    assert info.limits.max_faces_per_frame == config.max_faces_per_frame
    assert (info.limits.max_face_rules, info.limits.max_reference_images, info.limits.max_reference_side) == (
        config.max_face_rules, config.max_reference_images, config.max_reference_side)
    assert info.default_lost_faces == pb.LOST_FACE_POLICY_PASS and info.default_lost_face_frames == config.lost_face_frames
    assert info.default_match_threshold == pytest.approx(config.match_threshold)
    assert info.detect_every == config.detect_every

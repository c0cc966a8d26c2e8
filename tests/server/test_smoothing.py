"""server/smoothing.py: the One-Euro filter, IoU face tracking, and in-order smoothing of concurrent stream frames."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from facetwin.core.faces import Face
from facetwin.server.smoothing import FaceTracker, OneEuroFilter, SmoothingConfig, StreamFaceState, box_iou

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
    cfg = SmoothingConfig()
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
        SmoothingConfig(beta=-1)
    with pytest.raises(ValueError, match="min_iou"):
        SmoothingConfig(min_iou=0)


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_tracker_smooths_each_face_on_its_own_track():
    rng = np.random.default_rng(1)
    tracker = FaceTracker()
    left_out, right_out = [], []
    for frame in range(40):
        left = _face(50, 60, jitter=rng.normal(0, 1.5, (68, 2)))
        right = _face(400, 80, width=120, jitter=rng.normal(0, 1.5, (68, 2)))
        faces = [left, right] if frame % 2 else [right, left]  # list order must not matter
        smoothed = tracker.update(faces, frame)
        assert [f.box for f in smoothed] == [f.box for f in faces]  # boxes pass through, order kept
        by_x = sorted(smoothed, key=lambda f: f.box[0])
        left_out.append(by_x[0].landmarks)
        right_out.append(by_x[1].landmarks)
        assert not by_x[0].landmarks.flags.writeable
    assert tracker.track_count == 2
    for out, face in ((left_out, _face(50, 60)), (right_out, _face(400, 80, width=120))):
        error = np.abs(np.stack(out[10:]) - face.landmarks).mean()
        assert error < 0.6, error  # raw noise has a mean absolute error of 1.2 px; never pulled to the other face


def test_tracker_starts_new_tracks_and_forgets_lost_ones():
    tracker = FaceTracker(SmoothingConfig(max_missed=2))
    first = tracker.update([_face(0, 0)], 0)[0]
    np.testing.assert_array_equal(first.landmarks, _face(0, 0).landmarks)  # a new track starts at the detection
    moved = tracker.update([_face(10, 0)], 1)[0]  # IoU 0.82: the same face, smoothed towards its past
    assert 0 < moved.landmarks[:, 0].mean() - _face(0, 0).landmarks[:, 0].mean() < 10
    jumped = tracker.update([_face(500, 0)], 2)[0]  # no overlap: another face, taken as detected
    np.testing.assert_array_equal(jumped.landmarks, _face(500, 0).landmarks)
    assert tracker.track_count == 2
    tracker.update([], 6)  # the first track was last seen at frame 1: more than max_missed frames ago
    assert tracker.track_count == 0
    tracker.update([_face(0, 0)], 7)
    with pytest.raises(ValueError, match="in order"):
        tracker.update([_face(0, 0)], 7)


def test_box_only_faces_have_their_box_smoothed():
    tracker = FaceTracker()
    tracker.update([Face((0, 0, 100, 100), None, 1.0, "haar")], 0)
    out = tracker.update([Face((6, 0, 106, 100), None, 1.0, "haar")], 1)[0]
    assert out.landmarks is None and 0 < out.box[0] < 6 and out.width == 100


async def test_stream_state_runs_tracker_steps_in_ticket_order_whatever_order_frames_finish():
    state = StreamFaceState()
    tickets = [state.ticket() for _ in range(5)]
    order = []

    async def frame(ticket, delay_s: float, x: float):
        await asyncio.sleep(delay_s)  # detection taking longer for earlier frames
        if ticket.number == 2:
            ticket.release()  # this frame failed before smoothing: later frames must not wait for it
            return None
        smoothed = await ticket.smooth([_face(x, 0)])
        order.append(ticket.number)
        return smoothed[0]

    results = await asyncio.wait_for(asyncio.gather(
        *(frame(t, 0.05 - 0.01 * i, 10.0 * i) for i, t in enumerate(tickets))), timeout=5)
    assert order == [0, 1, 3, 4]
    xs = [r.landmarks[:, 0].mean() for r in results if r is not None]
    assert xs == sorted(xs)  # the filter saw the frames in order: the smoothed face only moves right
    with pytest.raises(RuntimeError, match="already used"):
        await tickets[0].smooth([])


async def test_a_frame_cancelled_while_waiting_gives_up_its_turn():
    state = StreamFaceState()
    first, second, third = state.ticket(), state.ticket(), state.ticket()
    waiting = [asyncio.ensure_future(t.smooth([_face(0, 0)])) for t in (second, third)]
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in waiting)  # both wait for the first frame's turn
    waiting[0].cancel()  # the caller went away while the second frame waited
    await asyncio.gather(waiting[0], return_exceptions=True)
    assert not waiting[1].done()
    await first.smooth([_face(0, 0)])
    assert len(await asyncio.wait_for(waiting[1], 1)) == 1  # the third runs once the first is done

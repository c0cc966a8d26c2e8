"""Temporal smoothing of face landmarks across the frames of one stream, so swapped video does not jitter.

Landmark detectors fit each frame independently; on a still face their points wander by a pixel or two from frame
to frame, and the aligned crop (and so the pasted face) wobbles with them. Three pieces fix that:

* ``OneEuroFilter`` (Casiez, Roussel & Vogel, CHI 2012): a low-pass filter whose cutoff rises with the signal's
  speed — strong smoothing while the face is still (no jitter), little while it moves (little lag).
* ``FaceTracker``: matches this frame's faces to the previous frame's by box overlap (IoU, greedy) and keeps one
  filter per track, so two people in a frame never get averaged into each other.
* ``StreamFaceState``: owned by one SwapStream. Frames of a stream are swapped concurrently, but a filter must see
  them in order: each frame takes a ``FrameTicket`` when its swap starts (arrival order), detects in parallel with
  the others, then waits for its turn to run the (cheap) tracker step.

Time is counted in frames at a nominal rate, not wall-clock arrival time: a stream under back-pressure delivers
frames in bursts, and arrival times would make the filter's time step (and its smoothing) erratic.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math

import numpy as np

from facetwin.core.faces import Face


@dataclasses.dataclass(frozen=True)
class SmoothingConfig:
    """One-Euro and tracking parameters. Positions are filtered in units of the face's width, so the same values
    work for a 100 px face in a webcam frame and a 600 px face in 4K."""

    min_cutoff_hz: float = 1.0  # cutoff while the face is still: lower = smoother, more lag on slow motion
    beta: float = 2.0  # how fast the cutoff rises with speed (per face-width/s): higher = less lag when moving
    d_cutoff_hz: float = 1.0  # cutoff of the speed estimate itself (the paper's recommended 1 Hz)
    frame_rate_hz: float = 30.0  # nominal frame rate: one frame advances the filters' clock by 1/frame_rate_hz
    min_iou: float = 0.3  # boxes of consecutive frames overlapping less than this are different faces
    max_missed: int = 3  # frames a track survives without a matching face (a missed detection) before it is dropped

    def __post_init__(self) -> None:
        if self.min_cutoff_hz <= 0 or self.d_cutoff_hz <= 0 or self.frame_rate_hz <= 0:
            raise ValueError("min_cutoff_hz, d_cutoff_hz and frame_rate_hz must be > 0")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0 < self.min_iou <= 1:
            raise ValueError(f"min_iou must be in (0, 1], got {self.min_iou}")
        if self.max_missed < 0:
            raise ValueError(f"max_missed must be >= 0, got {self.max_missed}")


def _alpha(cutoff_hz: np.ndarray | float, dt: float) -> np.ndarray | float:
    """Smoothing factor of a first-order low-pass filter with this cutoff, sampled every dt seconds."""
    tau = 1.0 / (2 * math.pi * cutoff_hz)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """One-Euro filter over arrays of any fixed shape, each element filtered independently."""

    def __init__(self, min_cutoff_hz: float = 1.0, beta: float = 0.0, d_cutoff_hz: float = 1.0) -> None:
        if min_cutoff_hz <= 0 or d_cutoff_hz <= 0 or beta < 0:
            raise ValueError(f"need min_cutoff_hz > 0, d_cutoff_hz > 0, beta >= 0; got "
                             f"{min_cutoff_hz}, {d_cutoff_hz}, {beta}")
        self.min_cutoff_hz, self.beta, self.d_cutoff_hz = min_cutoff_hz, beta, d_cutoff_hz
        self._value: np.ndarray | None = None
        self._speed: np.ndarray | None = None

    def reset(self) -> None:
        self._value = self._speed = None

    def __call__(self, value: np.ndarray, dt: float) -> np.ndarray:
        """The filtered value of the next sample, taken dt seconds after the previous one (float64 copy)."""
        x = np.array(value, dtype=np.float64)
        if self._value is None:
            self._value, self._speed = x, np.zeros_like(x)
            return x.copy()
        if x.shape != self._value.shape:
            raise ValueError(f"sample shape {x.shape} differs from the filter's {self._value.shape}: reset() first")
        if not dt > 0:
            raise ValueError(f"dt must be > 0 seconds, got {dt}")
        speed = (x - self._value) / dt
        self._speed = self._speed + _alpha(self.d_cutoff_hz, dt) * (speed - self._speed)
        cutoff = self.min_cutoff_hz + self.beta * np.abs(self._speed)
        self._value = self._value + _alpha(cutoff, dt) * (x - self._value)
        return self._value.copy()


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 when either is empty."""
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    if inter_w <= 0 or inter_h <= 0:
        return 0.0
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclasses.dataclass(eq=False)
class _Track:
    filter: OneEuroFilter
    box: tuple[int, int, int, int]  # the last matched detector box
    unit: float  # face width when the track started: positions are filtered in these units
    last_frame: int  # frame number of the last match
    landmark_model: str | None  # "68", "5" or None (box only): a track only matches faces of the same kind


class FaceTracker:
    """Per-track One-Euro smoothing of face landmarks (or of the box, for detectors without landmarks)."""

    def __init__(self, config: SmoothingConfig | None = None) -> None:
        self.config = config or SmoothingConfig()
        self._tracks: list[_Track] = []

    @property
    def track_count(self) -> int:
        return len(self._tracks)

    def update(self, faces: list[Face], frame: int) -> list[Face]:
        """The faces of frame number `frame` (strictly increasing per tracker), smoothed; same order as given.

        A face keeps its detector box; its landmarks (or, without landmarks, its box) are replaced by the
        filtered ones. A face matching no track starts one and comes back unchanged."""
        cfg = self.config
        self._tracks = [t for t in self._tracks if frame - t.last_frame <= cfg.max_missed + 1]
        pairs = sorted(((box_iou(t.box, f.box), ti, fi) for ti, t in enumerate(self._tracks)
                        for fi, f in enumerate(faces)), reverse=True)
        matched: dict[int, _Track] = {}
        used: set[int] = set()
        for iou, ti, fi in pairs:  # greedy: the best-overlapping pairs first
            if iou < cfg.min_iou:
                break
            track = self._tracks[ti]
            if ti in used or fi in matched or track.landmark_model != faces[fi].landmark_model:
                continue
            used.add(ti)
            matched[fi] = track
        out = []
        for fi, face in enumerate(faces):
            track = matched.get(fi)
            if track is None:
                track = _Track(OneEuroFilter(cfg.min_cutoff_hz, cfg.beta, cfg.d_cutoff_hz), face.box,
                               float(max(face.width, 1)), frame, face.landmark_model)
                self._tracks.append(track)
                dt = 1.0 / cfg.frame_rate_hz  # unused by a fresh filter's first sample
            else:
                dt = (frame - track.last_frame) / cfg.frame_rate_hz
                if dt <= 0:
                    raise ValueError(f"frame {frame} is not after frame {track.last_frame}: frames must come in order")
            track.box, track.last_frame = face.box, frame
            out.append(self._smooth(face, track, dt))
        return out

    @staticmethod
    def _smooth(face: Face, track: _Track, dt: float) -> Face:
        if face.landmarks is not None:
            points = track.filter(np.asarray(face.landmarks, np.float64) / track.unit, dt) * track.unit
            landmarks = points.astype(np.float32)
            landmarks.setflags(write=False)
            return dataclasses.replace(face, landmarks=landmarks)
        corners = track.filter(np.asarray(face.box, np.float64) / track.unit, dt) * track.unit
        return dataclasses.replace(face, box=tuple(int(round(v)) for v in corners))


class FrameTicket:
    """A frame's place in its stream's smoothing order; see StreamFaceState. Always release() it (idempotent)."""

    def __init__(self, state: "StreamFaceState", number: int) -> None:
        self._state, self.number, self._done = state, number, False

    async def smooth(self, faces: list[Face]) -> list[Face]:
        """Waits until every earlier frame of the stream was smoothed or released, then smooths these faces."""
        if self._done:
            raise RuntimeError(f"frame ticket {self.number} was already used")
        try:
            await self._state._wait_for_turn(self.number)
            return self._state.tracker.update(faces, self.number)
        finally:
            self.release()

    def release(self) -> None:
        """Gives up this frame's turn (the frame failed, or needs no smoothing) so later frames do not wait."""
        if not self._done:
            self._done = True
            self._state._finish(self.number)


class StreamFaceState:
    """Face tracks of one SwapStream. Create one per stream; take a ticket() when each frame's swap starts."""

    def __init__(self, config: SmoothingConfig | None = None) -> None:
        self.tracker = FaceTracker(config)
        self._issued = 0  # tickets handed out
        self._turn = 0  # the ticket whose tracker step runs next
        self._finished: set[int] = set()  # released tickets the turn has not reached yet
        self._waiters: dict[int, asyncio.Event] = {}  # ticket number -> set when its turn comes

    def ticket(self) -> FrameTicket:
        """The next frame's ticket; take them in frame order (synchronously, before the swap awaits anything)."""
        ticket = FrameTicket(self, self._issued)
        self._issued += 1
        return ticket

    async def _wait_for_turn(self, number: int) -> None:
        if self._turn != number:
            await self._waiters.setdefault(number, asyncio.Event()).wait()

    def _finish(self, number: int) -> None:
        self._finished.add(number)
        while self._turn in self._finished:
            self._finished.remove(self._turn)
            self._waiters.pop(self._turn, None)
            self._turn += 1
        waiter = self._waiters.get(self._turn)
        if waiter is not None:
            waiter.set()

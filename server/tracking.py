"""Face tracks of one stream: detection every few frames, FaceMesh following in between, One-Euro smoothing, track
ids, and what becomes of a face that is lost.

* ``FaceTracks.update`` runs once per frame, in frame order. On a detection frame (every ``detect_every``-th) the
  detector's faces are matched to the tracks by box overlap (IoU, greedy); unmatched faces start tracks with new ids.
  In between, each track is followed from its previous mesh with one FaceMesh pass (``FaceDetector.follow``,
  MediaPipe's tracking step: ~8 ms against ~90 ms for a 1080p detection); when FaceMesh's confidence that the face is
  still there falls below ``min_confidence`` the detector runs on that frame at once. A track neither detected nor
  followed is *lost*: it is reported, with its last box and landmarks, for ``lost_face_frames`` frames (the stream's
  lost-face policy decides what is pasted there meanwhile: nothing, the last swap, or a blur) and then ends; the
  detector searches every frame meanwhile, and a face found again within that time (boxes overlapping) keeps its id.
  New faces are found by the next detection frame. Detectors without meshes (dlib, Haar) detect every frame.
* ``OneEuroFilter`` (Casiez, Roussel & Vogel, CHI 2012) smooths each track's landmarks: a low-pass filter whose cutoff
  rises with the signal's speed — strong smoothing while the face is still (no jitter), little while it moves.
* ``StreamFaceState`` / ``FrameTicket``: frames of a stream are swapped concurrently, but tracks must see them in
  order. Each frame takes a ticket when its swap starts (arrival order), may detect in parallel with the others, then
  waits for its turn to run its tracking step.

Time is counted in frames at a nominal rate, not wall-clock arrival time: a stream under back-pressure delivers
frames in bursts, and arrival times would make the filter's time step (and its smoothing) erratic.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np

from facetwin.core.faces import Face

DETECTED, TRACKED, LOST = "detected", "tracked", "lost"  # how a face was found in a frame
LOST_POLICIES = ("pass", "hold", "blur")  # what a stream pastes where a lost face was: nothing, its last swap, a blur
MAX_LOST_FACE_FRAMES = 300  # 10 s at 30 frames/s: a stream asking to remember a lost face longer is refused
MAX_FACES = 32  # most faces a full frame keeps and a stream follows, the largest (FaceMesh runs once per face)
ASPECT_TOLERANCE = 0.02  # a stream's frame resized with width and height within 2 % of each other: the picture scaled

Detect = Callable[[np.ndarray], Awaitable[list[Face]]]
Follow = Callable[[np.ndarray, list[Face]], Awaitable[list[tuple[Face, float]]]]
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """Tracking and One-Euro parameters (the server's; a stream may choose its own lost-face policy and frames).
    Positions are filtered in units of the face's width, so the same values work for a 100 px face in a webcam frame
    and a 600 px face in 4K."""

    min_cutoff_hz: float = 1.0  # cutoff while the face is still: lower = smoother, more lag on slow motion
    beta: float = 2.0  # how fast the cutoff rises with speed (per face-width/s): higher = less lag when moving
    d_cutoff_hz: float = 1.0  # cutoff of the speed estimate itself (the paper's recommended 1 Hz)
    frame_rate_hz: float = 30.0  # nominal frame rate: one frame advances the filters' clock by 1/frame_rate_hz
    min_iou: float = 0.3  # boxes overlapping less than this are different faces
    detect_every: int = 10  # the detector runs on every N-th frame of a stream; faces are followed in between
    min_confidence: float = 0.5  # FaceMesh's face confidence below which a followed face is looked for again
    lost_faces: str = "pass"  # the default lost-face policy, one of LOST_POLICIES
    lost_face_frames: int = 10  # frames a lost face is reported (and held or blurred) before its track ends
    max_faces: int = MAX_FACES  # most faces followed at once, the largest

    def __post_init__(self) -> None:
        if self.min_cutoff_hz <= 0 or self.d_cutoff_hz <= 0 or self.frame_rate_hz <= 0:
            raise ValueError("min_cutoff_hz, d_cutoff_hz and frame_rate_hz must be > 0")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0 < self.min_iou <= 1:
            raise ValueError(f"min_iou must be in (0, 1], got {self.min_iou}")
        if self.detect_every < 1:
            raise ValueError(f"detect_every must be >= 1, got {self.detect_every}")
        if self.max_faces < 1:
            raise ValueError(f"max_faces must be >= 1, got {self.max_faces}")
        if not 0 <= self.min_confidence < 1:
            raise ValueError(f"min_confidence must be in [0, 1), got {self.min_confidence}")
        check_lost_faces(self.lost_faces, self.lost_face_frames)


def check_lost_faces(policy: str, frames: int) -> None:
    if policy not in LOST_POLICIES:
        raise ValueError(f"lost-face policy {policy!r} must be one of {', '.join(LOST_POLICIES)}")
    if not 0 <= frames <= MAX_LOST_FACE_FRAMES:
        raise ValueError(f"lost_face_frames must be in 0..{MAX_LOST_FACE_FRAMES}, got {frames}")


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
class Track:
    """One face followed through a stream."""

    id: int  # 1, 2, ... in order of appearance; never reused within a stream
    face: Face  # the latest fit, unsmoothed (the detector's, or FaceMesh's when followed): the next frame starts here
    shown: Face  # the latest face as aligned and reported: landmarks smoothed
    filter: OneEuroFilter
    unit: float  # face width when the track started: positions are filtered in these units
    last_seen: int  # frame number of the latest frame the face was found in
    lost_since: int | None = None  # first frame of the current loss; None while the face is found
    # Filled in by the frames that use them (fullframe.py): the face descriptor, computed once per track when a face
    # mapping compares faces with references; the latest swap of the face, which a lost face's hold pastes again; and
    # where the swapped face's landmarks lie relative to the original's, which the shape bend refits every few frames.
    embedding: asyncio.Future | None = None
    target: str | None = None  # the identity the face was last swapped to (None: it was not swapped)
    paste: asyncio.Future | None = None  # the latest frame's paste of this face, resolved once that frame blended
    shape_offset: asyncio.Future | None = None  # (68, 2) swapped minus original landmarks in crop sides, once fitted
    shape_fitted_at: int | None = None  # the frame whose swap the offset is fitted on

    @property
    def lost(self) -> bool:
        return self.lost_since is not None


@dataclasses.dataclass(frozen=True, eq=False)
class TrackedFace:
    """A face of one frame: as aligned (smoothed landmarks; for a lost face where it was last seen), its track id and
    how it was found."""

    face: Face
    track_id: int
    state: str  # DETECTED | TRACKED | LOST
    track: Track | None = None  # None outside streams

    @property
    def present(self) -> bool:
        return self.state != LOST


def ordered(faces: list[TrackedFace]) -> list[TrackedFace]:
    """Faces found in the frame largest first, then the lost ones largest first (faces are numbered in this order)."""
    return sorted(faces, key=lambda f: (not f.present, -f.face.area))


class FaceTracks:
    """The face tracks of one stream; update() once per frame, in frame order."""

    def __init__(self, config: TrackingConfig | None = None, lost_face_frames: int | None = None) -> None:
        self.config = config or TrackingConfig()
        self.lost_face_frames = self.config.lost_face_frames if lost_face_frames is None else lost_face_frames
        self.tracks: list[Track] = []
        self._next_id = 1
        self._size: tuple[int, int] | None = None  # (height, width) of the frames the tracks' places are in

    def wants_detection(self, frame: int) -> bool:
        """Whether frame number `frame` is a detection frame (known up front, so its detection can start at once)."""
        return frame % self.config.detect_every == 0

    async def update(self, frame: int, image: np.ndarray, detected: list[Face] | None, detect: Detect,
                     follow: Follow | None) -> list[TrackedFace]:
        """The faces of frame number `frame` (strictly increasing), ordered(): detected (the detector's faces of a
        detection frame, else None), followed from the previous frame, or lost. follow: None when the detector
        cannot follow (no meshes): every frame must then be a detection frame."""
        cfg = self.config
        ended_by_resize = self._fit_to(image)
        self.tracks = [t for t in self.tracks if not (t.lost and frame - t.lost_since >= self.lost_face_frames)]
        if any(frame <= t.last_seen for t in self.tracks):
            raise ValueError(f"frame {frame} is not after frame {max(t.last_seen for t in self.tracks)}: "
                             "frames must come in order")
        found: dict[Track, tuple[Face, str]] = {}
        present = [t for t in self.tracks if not t.lost]
        # Without meshes to follow, every frame is detected; with them, a face followed with too little confidence
        # makes the detector look at this very frame, and so does every frame while a face is lost (for at most
        # lost_face_frames frames), so that a face coming back is found at once.
        if detected is None and (ended_by_resize or follow is None
                                 or await self._follow(image, present, found, follow)
                                 or len(present) < len(self.tracks)):
            detected = await detect(image)
        if detected is not None:
            unmatched = self._match(detected, found)
            if follow is not None:  # the detector missed a face FaceMesh may still hold (e.g. small at 640 px)
                await self._follow(image, [t for t in present if t not in found], found, follow)
            ended = self._duplicates(found)
            self.tracks = [t for t in self.tracks if t not in ended]
            for face in self._largest(found, unmatched):
                track = Track(self._next_id, face, face, OneEuroFilter(cfg.min_cutoff_hz, cfg.beta, cfg.d_cutoff_hz),
                              float(max(face.width, 1)), frame - 1)
                self._next_id += 1
                self.tracks.append(track)
                found[track] = (face, DETECTED)
        out = []
        for track in self.tracks:
            if track in found:
                face, state = found[track]
                dt = (frame - track.last_seen) / cfg.frame_rate_hz
                track.face, track.shown = face, self._smooth(face, track, dt)
                track.last_seen, track.lost_since = frame, None
                out.append(TrackedFace(track.shown, track.id, state, track))
            else:
                if track.lost_since is None:
                    track.lost_since = frame
                if frame - track.lost_since < self.lost_face_frames:
                    out.append(TrackedFace(track.shown, track.id, LOST, track))
        self.tracks = [t for t in self.tracks if not t.lost or frame - t.lost_since < self.lost_face_frames]
        return ordered(out)

    def _fit_to(self, image: np.ndarray | None) -> bool:
        """Keeps the tracks' places in the frame's pixels when a stream's frames change size (adaptive bitrate, a
        new source): the same picture scaled keeps its tracks, scaled with it; a different aspect ratio (cropped,
        letterboxed) ends them all, so that nothing is held or blurred where a face no longer is. A held face's
        last paste, in the old frame's pixels, is not pasted again. True when tracks ended: the frame is then
        detected, its faces starting new tracks."""
        size = None if image is None else (int(image.shape[0]), int(image.shape[1]))
        old, self._size = self._size, size
        if old is None or size is None or size == old or not self.tracks:
            return False
        scale_y, scale_x = size[0] / old[0], size[1] / old[1]
        if abs(scale_x / scale_y - 1.0) > ASPECT_TOLERANCE:
            self.tracks = []
            return True
        scale = (scale_x + scale_y) / 2
        for track in self.tracks:
            # The filter works in units of the track's first face width: scaled with the faces, its state holds.
            track.face, track.shown = _scaled(track.face, scale), _scaled(track.shown, scale)
            track.unit *= scale
            track.paste = None
        return False

    def _largest(self, found: dict, unmatched: list[Face]) -> list[Face]:
        """A crowd: the max_faces largest faces of a detection frame are kept, as the detector keeps them (each
        followed face costs a FaceMesh pass per frame). The other faces' tracks end, and the other new faces get
        none. Returns the new faces kept."""
        faces = [(face, track) for track, (face, _) in found.items()] + [(face, None) for face in unmatched]
        if len(faces) <= self.config.max_faces:
            return unmatched
        faces.sort(key=lambda pair: pair[0].area, reverse=True)
        for _, track in faces[self.config.max_faces:]:
            if track is not None:
                del found[track]
                self.tracks.remove(track)
        kept = {id(face) for face, track in faces[:self.config.max_faces] if track is None}
        return [face for face in unmatched if id(face) in kept]

    async def _follow(self, image: np.ndarray, tracks: list[Track], found: dict, follow: Follow) -> bool:
        """Follows the tracks that have a mesh into this frame; True when one of them lost confidence."""
        tracks = [t for t in tracks if t.face.mesh is not None]
        if not tracks:
            return False
        weak = False
        for track, (face, confidence) in zip(tracks, await follow(image, [t.face for t in tracks])):
            if confidence >= self.config.min_confidence:
                found[track] = (face, TRACKED)
            else:
                weak = True
        return weak

    def _match(self, detected: list[Face], found: dict) -> list[Face]:
        """Gives each detected face to the track whose box overlaps it most (greedy, IoU >= min_iou, same landmark
        model), lost tracks included; returns the faces no track took."""
        def box(track: Track) -> tuple:
            return found[track][0].box if track in found else track.face.box

        pairs = sorted(((box_iou(box(t), d.box), ti, di) for ti, t in enumerate(self.tracks)
                        for di, d in enumerate(detected)), key=lambda p: p[0], reverse=True)
        taken_tracks: set[int] = set()
        taken_faces: set[int] = set()
        for iou, ti, di in pairs:
            if iou < self.config.min_iou:
                break
            track, face = self.tracks[ti], detected[di]
            if ti in taken_tracks or di in taken_faces or track.face.landmark_model != face.landmark_model:
                continue
            taken_tracks.add(ti)
            taken_faces.add(di)
            found[track] = (face, DETECTED)
        return [face for di, face in enumerate(detected) if di not in taken_faces]

    @staticmethod
    def _duplicates(found: dict) -> set[Track]:
        """Followed tracks that drifted onto a face the detector gave another track: they end (taken out of found)."""
        detected = [face.box for face, state in found.values() if state == DETECTED]
        ended = {track for track, (face, state) in found.items()
                 if state == TRACKED and any(box_iou(face.box, box) >= 0.5 for box in detected)}
        for track in ended:
            del found[track]
        return ended

    @staticmethod
    def _smooth(face: Face, track: Track, dt: float) -> Face:
        if face.landmarks is not None:
            points = track.filter(np.asarray(face.landmarks, np.float64) / track.unit, dt) * track.unit
            landmarks = points.astype(np.float32)
            landmarks.setflags(write=False)
            return dataclasses.replace(face, landmarks=landmarks)
        corners = track.filter(np.asarray(face.box, np.float64) / track.unit, dt) * track.unit
        return dataclasses.replace(face, box=tuple(int(round(v)) for v in corners))


def _scaled(face: Face, scale: float) -> Face:
    """The face in a frame scaled by `scale`."""
    def points(array: np.ndarray | None) -> np.ndarray | None:
        if array is None:
            return None
        out = (np.asarray(array, np.float64) * scale).astype(np.float32)
        out.setflags(write=False)
        return out

    box = tuple(int(round(v * scale)) for v in face.box)
    return dataclasses.replace(face, box=box, landmarks=points(face.landmarks), mesh=points(face.mesh))


class FrameTicket:
    """A frame's place in its stream's order; see StreamFaceState. Always release() it (idempotent)."""

    def __init__(self, state: "StreamFaceState", number: int) -> None:
        self._state, self.number, self._done = state, number, False

    async def run(self, step: Callable[[], Awaitable[T]]) -> T:
        """Waits until every earlier frame of the stream ran its step or was released, then runs this frame's step
        (holding the turn until it returns) and releases the turn."""
        if self._done:
            raise RuntimeError(f"frame ticket {self.number} was already used")
        try:
            await self._state._wait_for_turn(self.number)
            return await step()
        finally:
            self.release()

    def release(self) -> None:
        """Gives up this frame's turn (the frame failed, or needs no tracking) so later frames do not wait."""
        if not self._done:
            self._done = True
            self._state._finish(self.number)


class StreamFaceState:
    """Everything one SwapStream keeps from frame to frame: its face tracks, its lost-face policy and its face
    mapping. Create one per stream; take a ticket() when each frame's swap starts."""

    def __init__(self, config: TrackingConfig | None = None, lost_faces: str | None = None,
                 lost_face_frames: int | None = None, mapping: Any = None) -> None:
        """lost_faces / lost_face_frames: the stream's choice (None = the config's). mapping: the stream's face
        mapping (mapping.Mapping), or None when each frame says which faces to swap."""
        config = config or TrackingConfig()
        self.lost_faces = lost_faces or config.lost_faces
        frames = config.lost_face_frames if lost_face_frames is None else lost_face_frames
        check_lost_faces(self.lost_faces, frames)
        self.tracks = FaceTracks(config, frames)
        self.mapping = mapping
        self._issued = 0  # tickets handed out
        self._turn = 0  # the ticket whose step runs next
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

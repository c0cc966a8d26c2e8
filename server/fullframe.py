"""Full-frame swaps: find the faces (detect, or in a stream follow them from the last frame) -> decide which to swap to
whom (mapping.py) -> align -> swap through the batcher -> keep the face shape -> colour match -> paste back; and in a
stream, cover the faces it lost by its lost-face policy.

Detection, alignment, masks and paste-back are facetwin.core's, the same code training extraction crops with,
so the model sees the framing it was trained on. The swap itself goes through the same per-(model, target)
batcher as aligned-face requests: the faces of one frame are submitted together and batch with each other and
with everyone else's requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Hashable
from typing import Any

import cv2
import numpy as np

from facetwin.core import alignment, blending
from facetwin.core.faces import Face

from .batcher import BatchInfo
from .detectors import FaceDetectorPool
from .errors import ResourceExhaustedError
from .mapping import Decision, Mapping, decide
from .registry import LoadedTarget
from .tracking import DETECTED, FrameTicket, StreamFaceState, TrackedFace

# Bundles do not record the crop margin they were trained with (manifest.json has no field for it), and
# `facetwin-train extract` crops at alignment.DEFAULT_MARGIN unless told otherwise: assume that default. A model
# trained at another margin gets faces framed tighter or looser than it learned (worse swaps, nothing breaks).
ALIGN_MARGIN = alignment.DEFAULT_MARGIN
BLEND_FEATHER = blending.DEFAULT_FEATHER  # paste_back's mask erosion + blur width, as a fraction of the crop side
BLUR_SIDE = 32  # a lost face is blurred by warping it to this many pixels and back: ~1/30 of a 1080p face's detail
SWAPPED, NOT_SWAPPED, PASSED, HELD, BLURRED = "swapped", "not_swapped", "passed", "held", "blurred"


@dataclasses.dataclass(frozen=True, eq=False)
class FrameFace:
    """A face of the frame: as it was aligned (smoothed landmarks in a stream; a lost face where it was last seen),
    its track, how it was found, and what was done to it."""

    face: Face
    track_id: int
    state: str  # tracking.DETECTED | TRACKED | LOST
    action: str  # SWAPPED | NOT_SWAPPED | PASSED | HELD | BLURRED
    target: str | None = None  # the identity it was swapped to (SWAPPED, HELD)
    distance: float | None = None  # descriptor distance to the nearest reference photo (reference rules only)
    note: str = ""  # why it was or was not swapped

    @property
    def swapped(self) -> bool:
        """Whether a swap of this face is in the frame (swapped now, or held from an earlier frame)."""
        return self.action in (SWAPPED, HELD)


@dataclasses.dataclass(frozen=True, eq=False)
class FrameSwap:
    """The result of one full frame."""

    image: np.ndarray  # RGB uint8 (H, W, 3), same size as the input; the input itself when nothing was pasted
    mask: np.ndarray | None  # uint8 (H, W) blend weight of everything pasted, when asked for
    region: tuple[int, int, int, int] | None  # (x0, y0, x1, y1): the box holding every changed pixel; None: none did
    faces: tuple[FrameFace, ...]  # found faces largest first, then lost ones
    detect_s: float  # the detector (and its landmarks)
    track_s: float  # following faces from the previous frame (streams)
    embed_s: float  # face descriptors for reference rules
    align_s: float
    blend_s: float
    batch: BatchInfo  # the slowest face's: longest queue and inference, largest batch (all zero with no face)


@dataclasses.dataclass(frozen=True, eq=False)
class FrameRequest:
    """How to swap one frame."""

    targets: dict[str, LoadedTarget]  # every identity the mapping renders, by name (all of one model)
    target: str  # the request's target: rules without one render it
    mapping: Mapping
    caller: Hashable  # whose faces these are, for the batcher's fairness
    bounded: bool = True  # the faces count against the batcher's queue limit (False for stream frames)
    want_mask: bool = False
    keep_shape: float | None = None  # this frame's setting (see blending.finish_face), None = the swapper's


@dataclasses.dataclass(eq=False)
class _Aligned:
    crop: np.ndarray  # RGB uint8 (R, R, 3): the face as the model sees it
    matrix: np.ndarray  # 2x3 frame -> crop
    hull: np.ndarray  # uint8 (R, R) 0/255: where the original face is in the crop
    points: np.ndarray | None  # the original face's landmarks in crop pixels (68, 5 or none)
    landmarker: Callable[[np.ndarray, float], np.ndarray] | None = None  # the swapped crop's landmarks, for the bend
    fitted_offset: np.ndarray | None = None  # set by a landmarker that fitted the swapped crop afresh


@dataclasses.dataclass(frozen=True, eq=False)
class _Paste:
    """A finished swap of a face as it was pasted: what a lost face's hold pastes again, in the same place."""

    crop: np.ndarray
    hull: np.ndarray
    matrix: np.ndarray


@dataclasses.dataclass(eq=False)
class _Plan:
    """One frame's faces and what to do with each, decided in the stream's order."""

    faces: list[TrackedFace]  # ordered: found largest first, then lost
    decisions: list[Decision | None]  # per face; None for lost faces
    lost_actions: dict[int, str] = dataclasses.field(default_factory=dict)  # index into faces -> PASSED|HELD|BLURRED
    held: dict[int, asyncio.Future] = dataclasses.field(default_factory=dict)  # index -> the paste a hold repeats
    pastes: dict[int, asyncio.Future] = dataclasses.field(default_factory=dict)  # index -> this frame's paste (to set)
    # index -> the track's shape offset: a future this frame fits and sets (refit), or one an earlier frame sets
    offsets: dict[int, tuple[bool, asyncio.Future]] = dataclasses.field(default_factory=dict)


class _Clock:
    """Seconds spent per stage of one frame, around the awaits that do the work."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {"detect": 0.0, "track": 0.0, "embed": 0.0}

    def timed(self, stage: str, fn):
        async def run(*args):
            start = time.perf_counter()
            try:
                return await fn(*args)
            finally:
                self.spent[stage] += time.perf_counter() - start
        return run


class FullFrameSwapper:
    """Swaps the faces of whole frames; one per server, shared by every call and stream."""

    def __init__(self, detectors: FaceDetectorPool, margin: float = ALIGN_MARGIN, feather: float = BLEND_FEATHER,
                 keep_shape: float = blending.KEEP_SHAPE, max_faces: int = 8,
                 paste_mask: str = blending.PASTE_MASK) -> None:
        """max_faces: most faces one frame may swap (ServerConfig.max_faces_per_frame). paste_mask: where swaps are
        pasted, blending.PASTE_MASKS (ServerConfig.paste_mask)."""
        if not 0.0 <= keep_shape <= 1.0:
            raise ValueError(f"keep_shape must be in 0..1, got {keep_shape}")
        if paste_mask not in blending.PASTE_MASKS:
            raise ValueError(f"paste_mask must be one of {', '.join(blending.PASTE_MASKS)}, got {paste_mask!r}")
        self.detectors, self.margin, self.feather, self.keep_shape = detectors, margin, feather, keep_shape
        self.max_faces, self.paste_mask = max_faces, paste_mask

    async def swap(self, frame: np.ndarray, request: FrameRequest, stream: StreamFaceState | None = None,
                   ticket: FrameTicket | None = None) -> FrameSwap:
        """frame: RGB uint8 (H, W, 3). stream, ticket: the frame's stream and its place in it (faces are tracked),
        or None for a lone frame."""
        clock = _Clock()
        plan = None
        try:
            if ticket is None:
                plan = await self._plan_alone(frame, request, clock)
            else:
                can_follow = await self.detectors.can_follow()
                detected = None
                if not can_follow or stream.tracks.wants_detection(ticket.number):  # at once, beside other frames
                    detected = await clock.timed("detect", self.detectors.detect)(frame)
                plan = await ticket.run(lambda: self._plan_in_stream(frame, request, stream, ticket.number, detected,
                                                                     can_follow, clock))
            return await self._execute(frame, request, plan, clock)
        finally:
            if ticket is not None:
                ticket.release()
            futures = [*plan.pastes.values(), *(f for _, f in plan.offsets.values())] if plan is not None else []
            for future in futures:
                if not future.done():  # a frame that failed or was cancelled: nothing to hold, no offset fitted
                    future.set_result(None)

    async def _plan_alone(self, frame: np.ndarray, request: FrameRequest, clock: _Clock) -> _Plan:
        found = await clock.timed("detect", self.detectors.detect)(frame)
        faces = [TrackedFace(face, number, DETECTED) for number, face in enumerate(found, 1)]
        descriptors: list[np.ndarray | None] = [None] * len(faces)
        if request.mapping.compares_faces:
            embed = clock.timed("embed", self.detectors.embed)
            compared = faces[:self.max_faces]  # a crowd is not described face by face: the largest are compared
            descriptors[:len(compared)] = await asyncio.gather(*(embed(frame, f.face) for f in compared))
        return _Plan(faces, decide(faces, request.mapping, request.target, descriptors))

    async def _plan_in_stream(self, frame: np.ndarray, request: FrameRequest, stream: StreamFaceState, number: int,
                              detected: list[Face] | None, can_follow: bool, clock: _Clock) -> _Plan:
        """The frame's tracking step, decisions and lost-face actions; runs in the stream's frame order."""
        follow = clock.timed("track", self.detectors.follow) if can_follow else None
        faces = await stream.tracks.update(number, frame, detected, clock.timed("detect", self.detectors.detect),
                                           follow)
        present = [f for f in faces if f.present]
        descriptors: list[np.ndarray | None] = [None] * len(present)
        if request.mapping.compares_faces:
            for f in present[:self.max_faces]:  # once per track: the face's first frame starts it, later ones reuse it
                if f.track.embedding is None:
                    f.track.embedding = asyncio.ensure_future(clock.timed("embed", self.detectors.embed)(frame, f.face))
            compared = [asyncio.shield(f.track.embedding) for f in present[:self.max_faces]]
            descriptors[:len(compared)] = await asyncio.gather(*compared)
        plan = _Plan(faces, [None] * len(faces))
        loop = asyncio.get_running_loop()
        for decision, face in zip(decide(present, request.mapping, request.target, descriptors), present):
            index = faces.index(face)
            plan.decisions[index] = decision
            if face.track.target != decision.target:  # another identity draws another shape: fit it afresh
                face.track.shape_offset = None
            face.track.target = decision.target
            if decision.target is not None:  # this frame's paste of the face: a later frame that loses it may hold it
                face.track.paste = plan.pastes[index] = loop.create_future()
                track, refit = face.track, face.track.shape_offset is None
                refit = refit or number - track.shape_fitted_at >= stream.tracks.config.detect_every
                if refit:
                    track.shape_offset, track.shape_fitted_at = loop.create_future(), number
                plan.offsets[index] = (refit, track.shape_offset)
        for index, face in enumerate(faces):
            if face.present:
                continue
            if face.track.target is None:
                plan.lost_actions[index] = NOT_SWAPPED
            elif stream.lost_faces == "hold" and face.track.paste is not None:
                plan.lost_actions[index], plan.held[index] = HELD, face.track.paste
            else:
                plan.lost_actions[index] = BLURRED if stream.lost_faces == "blur" else PASSED
        return plan

    async def _execute(self, frame: np.ndarray, request: FrameRequest, plan: _Plan, clock: _Clock) -> FrameSwap:
        found_at = time.perf_counter()
        chosen = [i for i, d in enumerate(plan.decisions) if d is not None and d.target is not None]
        if len(chosen) > self.max_faces:  # before any face is aligned or swapped
            raise ResourceExhaustedError(f"the frame has {len(chosen)} faces to swap; this server swaps at most "
                                         f"{self.max_faces} per frame: pick faces by index (FACE_SELECTION_INDEX) or "
                                         "the largest (see GetServerInfo limits)")
        holds = {i: await asyncio.shield(future) for i, future in plan.held.items()}  # earlier frames' pastes
        covered = {i: action for i, action in plan.lost_actions.items() if action in (HELD, BLURRED)}
        if holds and any(paste is None for paste in holds.values()):  # the frame that pasted it failed
            covered = {i: a for i, a in covered.items() if a != HELD or holds[i] is not None}
        size = next(iter(request.targets.values())).manifest.resolution
        aligned = await asyncio.to_thread(self._align, frame, [plan.faces[i].face for i in chosen], size) \
            if chosen else []
        for i, face in zip(chosen, aligned):
            refit, offset = plan.offsets.get(i, (True, None))
            if offset is not None and not refit:  # fitted on an earlier frame of the track (None: that frame failed)
                offset = await asyncio.shield(offset)
            face.landmarker = self._landmarker(face, None if offset is None else (refit, offset))
        aligned_at = time.perf_counter()
        results = await self._infer([request.targets[plan.decisions[i].target] for i in chosen],
                                    [a.crop for a in aligned], request.caller, request.bounded)
        inferred_at = time.perf_counter()
        keep = self.keep_shape if request.keep_shape is None else request.keep_shape
        image, mask, region, finished = frame, None, None, []
        if chosen or covered or request.want_mask:
            image, mask, region, finished = await asyncio.to_thread(
                self._paste_all, frame, aligned, [r[0] for r in results], keep,
                [(plan.faces[i].face, holds.get(i)) for i in covered], request.want_mask)
        done = time.perf_counter()
        for i, paste in zip(chosen, finished):
            if i in plan.pastes:
                plan.pastes[i].set_result(paste)
        for i, face in zip(chosen, aligned):
            refit, offset = plan.offsets.get(i, (False, None))
            if refit and face.fitted_offset is not None:
                offset.set_result(face.fitted_offset)
        infos = [info for _, info in results] or [BatchInfo(0, 0.0, 0.0)]
        batch = BatchInfo(max(i.size for i in infos), max(i.queue_s for i in infos), max(i.inference_s for i in infos))
        faces = tuple(self._frame_face(i, face, plan, covered) for i, face in enumerate(plan.faces))
        return FrameSwap(image, mask, region, faces, clock.spent["detect"], clock.spent["track"], clock.spent["embed"],
                         aligned_at - found_at, done - inferred_at, batch)

    @staticmethod
    def _frame_face(index: int, face: TrackedFace, plan: _Plan, covered: dict[int, str]) -> FrameFace:
        decision = plan.decisions[index]
        if decision is not None:
            action = SWAPPED if decision.target is not None else NOT_SWAPPED
            return FrameFace(face.face, face.track_id, face.state, action, decision.target, decision.distance,
                             decision.note)
        action = plan.lost_actions[index]
        if action in (HELD, BLURRED) and index not in covered:
            action = PASSED  # nothing to hold: the frame that swapped it last failed
        target = face.track.target if action == HELD else None
        note = {NOT_SWAPPED: "lost; it was not being swapped", PASSED: "lost; the frame's own pixels are kept",
                HELD: "lost; its last swap is held where it was last seen",
                BLURRED: "lost; blurred where it was last seen"}[action]
        return FrameFace(face.face, face.track_id, face.state, action, target, note=note)

    def _align(self, frame: np.ndarray, chosen: list[Face], size: int) -> list[_Aligned]:
        out = []
        for face in chosen:  # 68 landmarks: hull mask; 5 (eye corners, nose) or none: the template's ellipse
            crop, matrix = alignment.align(frame, face, size, self.margin)
            points = None if face.landmarks is None else alignment.transform_points(face.landmarks, matrix)
            out.append(_Aligned(crop, matrix, blending.face_mask(size, points, self.margin), points))
        return out

    @staticmethod
    async def _infer(targets: list[LoadedTarget], crops: list[np.ndarray], caller: Hashable,
                     bounded: bool) -> list[tuple]:
        """All crops into their targets' batchers at once (they batch together); if one fails, the others are
        withdrawn."""
        tasks = [asyncio.ensure_future(target.batcher.submit(crop, caller, bounded))
                 for target, crop in zip(targets, crops)]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    def _paste_all(self, frame: np.ndarray, aligned: list[_Aligned], swapped: list[tuple[np.ndarray, np.ndarray]],
                   keep_shape: float,
                   covered: list[tuple[Face, _Paste | None]],
                   want_mask: bool) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int, int, int] | None,
                                             list[_Paste]]:
        """One copy of the frame with the swapped faces blended in and the lost ones covered (held or blurred), and
        the box around every pixel that changed."""
        image = np.array(frame)  # a writable copy; every paste changes only its face's region
        finished, regions = self._blend(image, aligned, swapped, keep_shape)
        pastes = finished + [self._blurred(image, face) if paste is None else paste for face, paste in covered]
        for paste in pastes[len(finished):]:
            regions.append(blending.paste_into(image, paste.crop, paste.hull, paste.matrix, self.feather))
        mask = self._mask(frame.shape[:2], pastes) if want_mask else None
        return image, mask, _union([r for r in regions if r is not None]), finished

    def _blend(self, image: np.ndarray, aligned: list[_Aligned], swapped: list[tuple[np.ndarray, np.ndarray]],
               keep_shape: float) -> tuple[list[_Paste], list[tuple[int, int, int, int] | None]]:
        """Bends, colour-matches and pastes each swapped face (the model's face and mask) into `image` (in place)
        through the paste mask rule; returns what was pasted, and where (paste_into's regions)."""
        out, regions = [], []
        for face, (new, model_mask) in zip(aligned, swapped):
            paste = blending.paste_mask(face.hull, model_mask, self.paste_mask)
            matched = blending.finish_face(face.crop, new, paste, face.points, self.margin, keep_shape,
                                           face.landmarker or self.detectors.crop_landmarks)
            regions.append(blending.paste_into(image, matched, paste, face.matrix, self.feather))
            out.append(_Paste(matched, paste, face.matrix))
        return out, regions

    def _landmarker(self, face: _Aligned, offset: tuple[bool, Any] | None) -> Callable[[np.ndarray, float],
                                                                                       np.ndarray]:
        """The swapped crop's landmarks for the shape bend. A lone frame fits them (FaceMesh, ~8 ms). A track fits them
        every detect_every frames (offset (True, future): the fit's offset from the original face's landmarks is
        kept in face.fitted_offset for the track) and in between moves the original face's landmarks by the offset
        last fitted (offset (False, array)): the decoder draws the target's shape, a nearly constant offset from the
        original's. On franck.mp4 (a real franck -> cap model) the estimate lay 0.024 of the eye distance from a fresh
        fit, the pasted faces 1.6 grey levels apart, and the bend moved 4x less from frame to frame (0.04 instead of
        0.16 crop pixels)."""
        fit = self.detectors.crop_landmarks
        if offset is None or face.points is None or len(face.points) != 68:
            return fit
        refit, fitted = offset
        side = face.crop.shape[0]

        def landmarks(swapped: np.ndarray, margin: float) -> np.ndarray:
            if not refit:
                return face.points + fitted * side
            points = fit(swapped, margin)
            face.fitted_offset = (points - face.points) / side
            return points
        return landmarks

    def _blurred(self, image: np.ndarray, face: Face) -> _Paste:
        """A lost face's last place, blurred: its aligned crop at BLUR_SIDE pixels, pasted back through its mask."""
        crop, matrix = alignment.align(image, face, BLUR_SIDE, self.margin)
        points = None if face.landmarks is None else alignment.transform_points(face.landmarks, matrix)
        blurred = cv2.GaussianBlur(crop, (0, 0), sigmaX=BLUR_SIDE / 16)
        return _Paste(blurred, blending.face_mask(BLUR_SIDE, points, self.margin), matrix)

    def _mask(self, shape: tuple[int, int], pastes: list[_Paste]) -> np.ndarray:
        """Where the frame was changed, 0..255: the same warp and feathering as each paste, of an all-white face."""
        weight = np.zeros((*shape, 3), np.uint8)
        for paste in pastes:
            face = np.zeros_like(weight)
            region = blending.paste_into(face, np.full_like(paste.crop, 255), paste.hull, paste.matrix, self.feather)
            if region is not None:
                x0, y0, x1, y1 = region
                np.maximum(weight[y0:y1, x0:x1], face[y0:y1, x0:x1], out=weight[y0:y1, x0:x1])
        return np.ascontiguousarray(weight[..., 0])


def _union(regions: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:
    """The smallest box (x0, y0, x1, y1) holding every box; None for none."""
    if not regions:
        return None
    x0s, y0s, x1s, y1s = zip(*regions)
    return min(x0s), min(y0s), max(x1s), max(y1s)

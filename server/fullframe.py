"""Full-frame swaps: detect -> landmarks -> (smooth) -> align -> swap through the batcher -> keep the face shape ->
colour match -> paste back.

Detection, alignment, masks and paste-back are server/faces.py's, the same code training extraction crops with,
so the model sees the framing it was trained on. The swap itself goes through the same per-(model, target)
batcher as aligned-face requests: the faces of one frame are submitted together and batch with each other and
with everyone else's requests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Hashable

import cv2
import numpy as np

from . import faces as facelib
from .batcher import BatchInfo
from .errors import InvalidInputError, UnavailableError
from .faces import Face, FaceDetector
from .registry import LoadedTarget
from .smoothing import FrameTicket

# Bundles do not record the crop margin they were trained with (manifest.json has no field for it), and
# `facetwin-train extract` crops at faces.DEFAULT_MARGIN unless told otherwise: assume that default. A model
# trained at another margin gets faces framed tighter or looser than it learned (worse swaps, nothing breaks).
ALIGN_MARGIN = facelib.DEFAULT_MARGIN
BLEND_FEATHER = facelib.DEFAULT_FEATHER  # paste_back's mask erosion + blur width, as a fraction of the crop side
# Colour transfer scales each LAB channel's spread by reference_std / source_std; clamp that gain so a nearly flat
# channel (a uniform skin patch at 32 px) cannot be amplified into noise.
COLOR_GAIN_RANGE = (0.5, 2.0)
MIN_MASK_PIXELS = 16  # fewer face pixels than this: too few for statistics, colour transfer is skipped
SELECTIONS = ("all", "largest", "index")


@dataclasses.dataclass(frozen=True)
class FaceSelection:
    """Which detected faces of a frame to swap. Faces are numbered largest first."""

    mode: str = "largest"  # "all" | "largest" | "index"
    index: int = 0  # with mode "index": the face to swap, 0 = largest

    def __post_init__(self) -> None:
        if self.mode not in SELECTIONS:
            raise InvalidInputError(f"face selection {self.mode!r} is not one of {SELECTIONS}")
        if self.index < 0:
            raise InvalidInputError(f"face_index must be >= 0, got {self.index}")

    def pick(self, count: int) -> list[int]:
        """Indices (into the largest-first face list) to swap. No faces -> none, whatever the mode."""
        if count == 0:
            return []
        if self.mode == "all":
            return list(range(count))
        if self.mode == "largest":
            return [0]
        if self.index >= count:
            raise InvalidInputError(f"face_index {self.index} is out of range: the frame has {count} face(s), "
                                    f"numbered 0..{count - 1} largest first (see SwapResponse.faces)")
        return [self.index]


@dataclasses.dataclass(frozen=True, eq=False)
class DetectedFace:
    """A face found in the frame, as it was aligned (smoothed landmarks in a stream), and whether it was swapped."""

    face: Face
    swapped: bool


@dataclasses.dataclass(frozen=True, eq=False)
class FrameSwap:
    """The result of one full frame."""

    image: np.ndarray  # RGB uint8 (H, W, 3), same size as the input; the input itself when nothing was swapped
    mask: np.ndarray | None  # uint8 (H, W) blend weight of the swapped faces, when asked for
    faces: tuple[DetectedFace, ...]  # every face found, largest first
    detect_s: float
    align_s: float
    blend_s: float
    batch: BatchInfo  # the slowest face's: longest queue and inference, largest batch (all zero with no face)


def match_color_lab(source: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """`source` with each CIELAB channel's mean and standard deviation moved to `reference`'s (Reinhard et al.
    2001), statistics taken where mask > 0 in both images. RGB uint8 (H, W, 3) in, RGB uint8 out.

    The decoder renders the target identity under the lighting of its training set; matching the original face's
    colour statistics makes the pasted face take on the frame's lighting and white balance."""
    if source.shape != reference.shape or source.ndim != 3 or source.shape[2] != 3:
        raise ValueError(f"source and reference must be RGB images of one shape, got {source.shape}, {reference.shape}")
    region = np.ones(source.shape[:2], bool) if mask is None else np.asarray(mask) > 0
    if region.shape != source.shape[:2]:
        raise ValueError(f"mask must be {source.shape[:2]} like the images, got {region.shape}")
    if region.sum() < MIN_MASK_PIXELS:
        return source.copy()
    # Float LAB (L 0..100, a/b about -128..127): 8-bit LAB would quantise the small shifts this makes.
    src = cv2.cvtColor(source.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    ref = cv2.cvtColor(reference.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    src_mean, src_std = src[region].mean(0), src[region].std(0)
    ref_mean, ref_std = ref[region].mean(0), ref[region].std(0)
    gain = np.clip(ref_std / np.maximum(src_std, 1e-6), *COLOR_GAIN_RANGE)
    out = (src - src_mean) * gain + ref_mean
    out[..., 0] = np.clip(out[..., 0], 0, 100)
    rgb = cv2.cvtColor(out.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def finish_face(crop: np.ndarray, swapped: np.ndarray, hull: np.ndarray, points: np.ndarray | None,
                margin: float = ALIGN_MARGIN, keep_shape: float = facelib.KEEP_SHAPE) -> np.ndarray:
    """The swapped crop as it is pasted: with 68 landmarks of the original face (`points`, crop pixels), bent
    `keep_shape` of the way to the original's face shape (faces.KEEP_SHAPE), then colour-matched to it.
    training/metrics.py scores swaps through this same function."""
    if keep_shape and points is not None and len(points) == 68:
        swapped = facelib.keep_shape(swapped, facelib.crop_landmarks(swapped, margin), points, keep_shape)
    return match_color_lab(swapped, crop, hull)


class FaceDetectorPool:
    """Face detection on a few worker threads, one FaceDetector per thread (dlib detectors are not thread-safe).

    Detection is the slow step of a full frame (tens of ms against ~1 ms for a small model's share of a batch);
    running it off the event loop keeps the server answering, and `threads` frames are detected at once."""

    def __init__(self, threads: int = 2, max_side: int | None = 640, backend: str = "auto",
                 landmarks: str = "auto") -> None:
        """landmarks: "68", "5" or "auto" (68 when its weights are found, else 5): see server/faces.py."""
        if threads < 1:
            raise ValueError(f"detect_threads must be >= 1, got {threads}")
        if max_side is not None and max_side < 64:
            raise ValueError(f"detect_max_side must be >= 64 pixels, got {max_side}")
        if str(landmarks) not in facelib.LANDMARK_MODELS:  # now, not at the first frame; "auto" resolves then
            raise ValueError(f"landmarks must be one of {', '.join(facelib.LANDMARK_MODELS)}, got {landmarks!r}")
        # Detectors are built on first use, in their threads: a server that never sees a full frame does not load
        # the 100 MB landmark model.
        self.max_side, self.backend, self.landmarks = max_side, backend, str(landmarks)
        self._local = threading.local()
        self._executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="facetwin-detect")

    def _detector(self) -> FaceDetector:
        detector = getattr(self._local, "detector", None)
        if detector is None:
            # Owns its dlib detector: one per thread.
            detector = FaceDetector(self.backend, max_side=self.max_side, landmarks=self.landmarks)
            self._local.detector = detector
        return detector

    def detect_sync(self, image: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 image, largest first (on the calling thread)."""
        try:
            detector = self._detector()
        except facelib.FaceModelsUnavailable as exc:
            raise UnavailableError(f"this server cannot detect faces ({exc}); send aligned faces "
                                   "(IMAGE_KIND_ALIGNED_FACE) or use a server with the face models installed") from None
        return detector.detect(image)

    async def detect(self, image: np.ndarray) -> list[Face]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.detect_sync, image)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


@dataclasses.dataclass(eq=False)
class _Aligned:
    crop: np.ndarray  # RGB uint8 (R, R, 3): the face as the model sees it
    matrix: np.ndarray  # 2x3 frame -> crop
    hull: np.ndarray  # uint8 (R, R) 0/255: where the original face is in the crop
    points: np.ndarray | None  # the original face's landmarks in crop pixels (68, 5 or none)


class FullFrameSwapper:
    """Swaps the faces of whole frames; one per server, shared by every call and stream."""

    def __init__(self, detectors: FaceDetectorPool, margin: float = ALIGN_MARGIN, feather: float = BLEND_FEATHER,
                 keep_shape: float = facelib.KEEP_SHAPE) -> None:
        if not 0.0 <= keep_shape <= 1.0:
            raise ValueError(f"keep_shape must be in 0..1, got {keep_shape}")
        self.detectors, self.margin, self.feather, self.keep_shape = detectors, margin, feather, keep_shape

    async def swap(self, frame: np.ndarray, target: LoadedTarget, caller: Hashable, selection: FaceSelection,
                   ticket: FrameTicket | None = None, want_mask: bool = False,
                   keep_shape: float | None = None) -> FrameSwap:
        """frame: RGB uint8 (H, W, 3). ticket: the frame's place in its stream (landmarks are smoothed), or None.
        keep_shape: this frame's setting (see finish_face), None = the swapper's."""
        started = time.perf_counter()
        try:
            found = await self.detectors.detect(frame)
            detected = time.perf_counter()
            if ticket is not None:
                found = await ticket.smooth(found)
        finally:
            if ticket is not None:
                ticket.release()
        chosen = selection.pick(len(found))
        faces = tuple(DetectedFace(face, i in chosen) for i, face in enumerate(found))
        if not chosen:
            mask = np.zeros(frame.shape[:2], np.uint8) if want_mask else None
            now = time.perf_counter()
            return FrameSwap(frame, mask, faces, detected - started, now - detected, 0.0, BatchInfo(0, 0.0, 0.0))
        size = target.manifest.resolution
        aligned = await asyncio.to_thread(self._align, frame, [found[i] for i in chosen], size)
        aligned_at = time.perf_counter()
        results = await self._infer(target, [a.crop for a in aligned], caller)
        inferred_at = time.perf_counter()
        keep = self.keep_shape if keep_shape is None else keep_shape
        image, mask = await asyncio.to_thread(self._blend, frame, aligned, [r[0][0] for r in results], want_mask, keep)
        done = time.perf_counter()
        infos = [info for _, info in results]
        batch = BatchInfo(max(i.size for i in infos), max(i.queue_s for i in infos), max(i.inference_s for i in infos))
        return FrameSwap(image, mask, faces, detected - started, aligned_at - detected, done - inferred_at, batch)

    def _align(self, frame: np.ndarray, chosen: list[Face], size: int) -> list[_Aligned]:
        out = []
        for face in chosen:  # 68 landmarks: hull mask; 5 (eye corners, nose) or none: the template's ellipse
            crop, matrix = facelib.align(frame, face, size, self.margin)
            points = None if face.landmarks is None else facelib.transform_points(face.landmarks, matrix)
            out.append(_Aligned(crop, matrix, facelib.face_mask(size, points, self.margin), points))
        return out

    @staticmethod
    async def _infer(target: LoadedTarget, crops: list[np.ndarray], caller: Hashable) -> list[tuple]:
        """All crops into the batcher at once (they batch together); if one fails, the others are withdrawn."""
        tasks = [asyncio.ensure_future(target.batcher.submit(crop, caller)) for crop in crops]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    def _blend(self, frame: np.ndarray, aligned: list[_Aligned], swapped: list[np.ndarray], want_mask: bool,
               keep_shape: float) -> tuple[np.ndarray, np.ndarray | None]:
        image = frame
        weight = np.zeros(frame.shape, np.uint8) if want_mask else None
        for face, new in zip(aligned, swapped):
            matched = finish_face(face.crop, new, face.hull, face.points, self.margin, keep_shape)
            image = facelib.paste_back(image, matched, face.hull, face.matrix, self.feather)
            if weight is not None:  # the same warp and feathering, of an all-white face: the blend weight
                white = np.full_like(face.crop, 255)
                weight = np.maximum(weight, facelib.paste_back(np.zeros_like(weight), white, face.hull, face.matrix,
                                                               self.feather))
        return image, None if weight is None else np.ascontiguousarray(weight[..., 0])

"""Full-frame swaps: detect -> landmarks -> (smooth) -> align -> swap through the batcher -> keep the face shape ->
colour match -> paste back.

Detection, alignment, masks and paste-back are facetwin.core's, the same code training extraction crops with,
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

import numpy as np

from facetwin.core import alignment, blending
from facetwin.core import faces as facelib
from facetwin.core.faces import Face, FaceDetector

from .batcher import BatchInfo
from .errors import InvalidInputError, ResourceExhaustedError, UnavailableError
from .registry import LoadedTarget
from .smoothing import FrameTicket

# Bundles do not record the crop margin they were trained with (manifest.json has no field for it), and
# `facetwin-train extract` crops at alignment.DEFAULT_MARGIN unless told otherwise: assume that default. A model
# trained at another margin gets faces framed tighter or looser than it learned (worse swaps, nothing breaks).
ALIGN_MARGIN = alignment.DEFAULT_MARGIN
BLEND_FEATHER = blending.DEFAULT_FEATHER  # paste_back's mask erosion + blur width, as a fraction of the crop side
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


class FaceDetectorPool:
    """Face detection on a few worker threads, one FaceDetector per thread (dlib detectors are not thread-safe).

    Detection is the slow step of a full frame (tens of ms against ~1 ms for a small model's share of a batch);
    running it off the event loop keeps the server answering, and `threads` frames are detected at once."""

    def __init__(self, threads: int = 2, max_side: int | None = 640, backend: str = "auto",
                 landmarks: str = "auto") -> None:
        """landmarks: "68", "5" or "auto" (68 when its weights are found, else 5): see facetwin.core.faces."""
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
            # One intra-op thread each: the pool's threads are the parallelism (blazeface's ONNX sessions
            # are shared and thread-safe; dlib's detectors are not, hence one detector per thread).
            detector = FaceDetector(self.backend, max_side=self.max_side, landmarks=self.landmarks, threads=1)
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

    def crop_landmarks(self, crop: np.ndarray, margin: float) -> np.ndarray:
        """68 landmarks of the face in an aligned crop, from the same landmarker as the frames' (the shape bend
        compares the two); on the calling thread."""
        return self._detector().crop_landmarks(crop, margin)

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

    async def swap(self, frame: np.ndarray, target: LoadedTarget, caller: Hashable, selection: FaceSelection,
                   ticket: FrameTicket | None = None, bounded: bool = True, want_mask: bool = False,
                   keep_shape: float | None = None) -> FrameSwap:
        """frame: RGB uint8 (H, W, 3). ticket: the frame's place in its stream (landmarks are smoothed), or None.
        bounded: the faces count against the batcher's queue limit (DynamicBatcher.submit; False for stream frames).
        keep_shape: this frame's setting (see blending.finish_face), None = the swapper's."""
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
        if len(chosen) > self.max_faces:  # before any face is aligned or swapped
            raise ResourceExhaustedError(f"the frame has {len(chosen)} faces to swap; this server swaps at most "
                                         f"{self.max_faces} per frame: pick faces by index (FACE_SELECTION_INDEX) or "
                                         "the largest (see GetServerInfo limits)")
        faces = tuple(DetectedFace(face, i in chosen) for i, face in enumerate(found))
        if not chosen:
            mask = np.zeros(frame.shape[:2], np.uint8) if want_mask else None
            now = time.perf_counter()
            return FrameSwap(frame, mask, faces, detected - started, now - detected, 0.0, BatchInfo(0, 0.0, 0.0))
        size = target.manifest.resolution
        aligned = await asyncio.to_thread(self._align, frame, [found[i] for i in chosen], size)
        aligned_at = time.perf_counter()
        results = await self._infer(target, [a.crop for a in aligned], caller, bounded)
        inferred_at = time.perf_counter()
        keep = self.keep_shape if keep_shape is None else keep_shape
        image, mask = await asyncio.to_thread(self._blend, frame, aligned, [r[0] for r in results], want_mask, keep)
        done = time.perf_counter()
        infos = [info for _, info in results]
        batch = BatchInfo(max(i.size for i in infos), max(i.queue_s for i in infos), max(i.inference_s for i in infos))
        return FrameSwap(image, mask, faces, detected - started, aligned_at - detected, done - inferred_at, batch)

    def _align(self, frame: np.ndarray, chosen: list[Face], size: int) -> list[_Aligned]:
        out = []
        for face in chosen:  # 68 landmarks: hull mask; 5 (eye corners, nose) or none: the template's ellipse
            crop, matrix = alignment.align(frame, face, size, self.margin)
            points = None if face.landmarks is None else alignment.transform_points(face.landmarks, matrix)
            out.append(_Aligned(crop, matrix, blending.face_mask(size, points, self.margin), points))
        return out

    @staticmethod
    async def _infer(target: LoadedTarget, crops: list[np.ndarray], caller: Hashable, bounded: bool) -> list[tuple]:
        """All crops into the batcher at once (they batch together); if one fails, the others are withdrawn."""
        tasks = [asyncio.ensure_future(target.batcher.submit(crop, caller, bounded)) for crop in crops]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    def _blend(self, frame: np.ndarray, aligned: list[_Aligned], swapped: list[tuple[np.ndarray, np.ndarray]],
               want_mask: bool, keep_shape: float) -> tuple[np.ndarray, np.ndarray | None]:
        """swapped: (face, the model's mask) of each aligned face."""
        image = frame
        weight = np.zeros(frame.shape, np.uint8) if want_mask else None
        for face, (new, model_mask) in zip(aligned, swapped):
            paste = blending.paste_mask(face.hull, model_mask, self.paste_mask)
            matched = blending.finish_face(face.crop, new, paste, face.points, self.margin, keep_shape,
                                           self.detectors.crop_landmarks)
            image = blending.paste_back(image, matched, paste, face.matrix, self.feather)
            if weight is not None:  # the same warp and feathering, of an all-white face: the blend weight
                white = np.full_like(face.crop, 255)
                weight = np.maximum(weight, blending.paste_back(np.zeros_like(weight), white, paste, face.matrix,
                                                               self.feather))
        return image, None if weight is None else np.ascontiguousarray(weight[..., 0])

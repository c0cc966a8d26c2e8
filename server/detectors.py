"""Face detection, following and description for full frames, on a few worker threads off the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import numpy as np

from facetwin.core import blazeface
from facetwin.core import faces as facelib
from facetwin.core.faces import Face, FaceDetector

from .errors import UnavailableError


def single_threaded_blas() -> None:
    """Makes BLAS and LAPACK (numpy's OpenBLAS and the copy OpenCV carries) run each call on its calling thread, for
    the whole process. The server's parallelism is its own threads (detection, inference, blending); a 100x100 solve
    in the shape bend that OpenBLAS splits over both cores of a busy 2-core host waited ~100 ms for the other core
    (0.1 ms on one thread)."""
    import threadpoolctl

    threadpoolctl.threadpool_limits(1, user_api="blas")


class FaceDetectorPool:
    """Face detection, following and description on a few worker threads, one FaceDetector per thread (dlib's
    detectors are not thread-safe; blazeface's ONNX sessions are shared).

    Detection is the slow step of a full frame (tens of ms against ~1 ms for a small model's share of a batch);
    running it off the event loop keeps the server answering, and `threads` frames are detected at once."""

    def __init__(self, threads: int = 2, max_side: int | None = 640, backend: str = "auto",
                 landmarks: str = "auto", runtime: str = "onnxruntime", max_faces: int | None = None) -> None:
        """landmarks: "68", "5" or "auto" (68 when its weights are found, else 5): see facetwin.core.faces.
        runtime: where blazeface's graphs run (facetwin.core.blazeface.RUNTIMES); on torch the calls of all
        `threads` detectors are joined into batches. max_faces: most faces a frame's detection keeps, the largest (None: all)."""
        if threads < 1:
            raise ValueError(f"detect_threads must be >= 1, got {threads}")
        if max_side is not None and max_side < 64:
            raise ValueError(f"detect_max_side must be >= 64 pixels, got {max_side}")
        if str(landmarks) not in facelib.LANDMARK_MODELS:  # now, not at the first frame; "auto" resolves then
            raise ValueError(f"landmarks must be one of {', '.join(facelib.LANDMARK_MODELS)}, got {landmarks!r}")
        # Detectors are built on first use, in their threads: a server that never sees a full frame does not load
        # the 100 MB landmark model.
        if runtime not in blazeface.RUNTIMES:
            raise ValueError(f"detect_runtime must be one of {', '.join(blazeface.RUNTIMES)}, got {runtime!r}")
        self.max_side, self.backend, self.landmarks, self.runtime = max_side, backend, str(landmarks), runtime
        self.max_faces = max_faces
        self._local = threading.local()
        self._embed_lock = threading.Lock()  # dlib's descriptor network is one per process and not thread-safe
        self._can_follow: bool | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="facetwin-detect")

    def _detector(self) -> FaceDetector:
        detector = getattr(self._local, "detector", None)
        if detector is None:
            # One intra-op thread each: the pool's threads are the parallelism (blazeface's ONNX sessions
            # are shared and thread-safe; dlib's detectors are not, hence one detector per thread).
            try:
                detector = FaceDetector(self.backend, max_side=self.max_side, landmarks=self.landmarks, threads=1,
                                        runtime=self.runtime, max_faces=self.max_faces)
            except facelib.FaceModelsUnavailable as exc:
                raise UnavailableError(f"this server cannot detect faces ({exc}); send aligned faces "
                                       "(IMAGE_KIND_ALIGNED_FACE) or use a server with the face models installed") from None
            self._local.detector = detector
        return detector

    def detect_sync(self, image: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 image, largest first (on the calling thread)."""
        return self._detector().detect(image)

    def crop_landmarks(self, crop: np.ndarray, margin: float) -> np.ndarray:
        """68 landmarks of the face in an aligned crop, from the same landmarker as the frames' (the shape bend
        compares the two); on the calling thread."""
        return self._detector().crop_landmarks(crop, margin)

    def embed_sync(self, image: np.ndarray, face: Face) -> np.ndarray:
        """dlib's 128-D descriptor of a face (faces.embed, ~75 ms on a CPU); on the calling thread."""
        with self._embed_lock:
            try:
                return facelib.embed(image, face)
            except facelib.FaceModelsUnavailable as exc:
                raise UnavailableError(f"this server cannot compare faces with reference photos ({exc}): use rules "
                                       "by place or track id, or a server with facetwin[faces] installed") from None

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def detect(self, image: np.ndarray) -> list[Face]:
        return await self._run(self.detect_sync, image)

    async def follow(self, image: np.ndarray, faces: list[Face]) -> list[tuple[Face, float]]:
        """FaceDetector.follow on a pool thread: the faces of the previous frame, found again in this one."""
        return await self._run(lambda: self._detector().follow(image, faces))

    async def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        return await self._run(self.embed_sync, image, face)

    async def can_follow(self) -> bool:
        """Whether the detector keeps meshes to follow faces with (blazeface), so streams detect every few frames."""
        if self._can_follow is None:
            self._can_follow = await self._run(lambda: self._detector().can_follow)
        return self._can_follow

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

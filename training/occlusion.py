"""Occlusion scores: does a served swap leave alone what sits in front of the face?

Held-out faces get synthetic occluders (occluders.py, drawn from OCCLUSION_SEED, a stream no training step draws
from) over every face, so the truth is known to the pixel: the visible face is the face mask minus the occluder.
Each face is swapped to every other target by the bundle's ONNX graph (evaluate.SwapRunner, what the server's ONNX
Runtime backend runs), and the server's paste is rebuilt in crop space: the hull of the landmarks the server's own
landmarker fits on the occluded face (blending.face_mask), combined with the model's mask by each --paste-mask rule
(blending.paste_mask), feathered as blending.paste_back feathers it. Scores, means over faces:

    mask_iou              IoU of the model's mask (>= 0.5) with the visible face
    <rule>.iou            IoU of the paste (weight >= 0.5) with the visible face
    <rule>.occluder_overwritten  mean paste weight over the occluder's pixels on the face: the share of the
                          occluder the swap paints over (0 = left alone)
    <rule>.face_covered   mean paste weight over the visible face: the share of the face that is swapped, so that a
                          rule cannot score well by pasting nothing
    *_clean               the same faces without occluders: what the rule costs on a bare face

Faces: synthetic held-out poses of a bundle trained on synthetic identities (truth: the renderer's face mask, which
leaves out hair), and/or an extracted data set's faces (truth: their stored masks, the landmark hull with the
forehead that extraction writes) of the bundle's own identities. The occluders come from the family training
draws from, a separate seed: this measures how well a model learnt that family, not real hands.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facetwin.core import alignment, blending
from facetwin.training import occluders, quality, synth
from facetwin.training.evaluate import SwapRunner, synth_identities
from facetwin.training.layout import HELD_OUT_POSES, HELD_OUT_SEED

OCCLUSION_SEED = 4321  # the held-out occluders' generator seed; training seeds each step from (seed, step, rank)
IDENTITY = np.array([[1.0, 0, 0], [0, 1.0, 0]])  # crop -> crop: the paste rebuilt in crop space


def with_occluders(faces: np.ndarray, masks: np.ndarray, seed: int = OCCLUSION_SEED) -> tuple[np.ndarray, np.ndarray]:
    """faces (N, R, R, 3) uint8 RGB, masks (N, R, R) uint8 -> (the faces each with an occluder, the occluders'
    coverage (N, R, R) float in [0, 1]), the same for a seed on every run."""
    x = torch.from_numpy(np.ascontiguousarray(faces.transpose(0, 3, 1, 2))).float() / 255.0
    m = torch.from_numpy(np.ascontiguousarray(masks[:, None])).float() / 255.0
    out, coverage = occluders.occlude(x, m, torch.Generator().manual_seed(seed), 1.0)
    occluded = (out.permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    return occluded, coverage[:, 0].numpy()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def paste_weight(paste: np.ndarray, feather: float = blending.DEFAULT_FEATHER) -> np.ndarray:
    """The blend weight (R, R) in [0, 1] paste_back gives a crop pasted through `paste` (crop space)."""
    white = np.full((*paste.shape, 3), 255, np.uint8)
    return blending.paste_back(np.zeros_like(white), white, paste, IDENTITY, feather)[..., 0] / 255.0


def score_faces(runner: SwapRunner, target: str, faces: np.ndarray, masks: np.ndarray, margin: float,
                rules: tuple[str, ...] = blending.PASTE_MASKS, seed: int = OCCLUSION_SEED) -> dict[str, Any]:
    """Scores (module docstring) of `faces` (N, R, R, 3) uint8 with true face `masks` (N, R, R) uint8, swapped to
    `target`, with occluders and without."""
    landmarker = quality._server_landmarker()
    occluded, coverage = with_occluders(faces, masks, seed)
    face = masks >= 128
    covered = coverage >= 0.5
    result: dict[str, Any] = {"faces": len(faces)}
    for label, crops, visible, hidden in (("", occluded, face & ~covered, face & covered),
                                          ("_clean", faces, face, None)):
        _, model_masks = runner.swap(crops, target)
        result["mask_iou" + label] = float(np.mean([_iou(m >= 0.5, v) for m, v in zip(model_masks, visible)]))
        hulls = [blending.face_mask(crop.shape[0], landmarker.crop_landmarks(crop, margin), margin) for crop in crops]
        for rule in rules:
            weights = [paste_weight(blending.paste_mask(h, m, rule)) for h, m in zip(hulls, model_masks)]
            scores = result.setdefault(rule, {})
            scores["iou" + label] = float(np.mean([_iou(w >= 0.5, v) for w, v in zip(weights, visible)]))
            scores["face_covered" + label] = float(np.mean([w[v].mean() for w, v in zip(weights, visible) if v.any()]))
            if hidden is not None:
                over = [w[h].mean() for w, h in zip(weights, hidden) if h.any()]
                scores["occluder_overwritten"] = float(np.mean(over)) if over else None
    result["occluded_faces"] = int(sum(h.any() for h in face & covered))
    result["occluder_share"] = float(np.mean([h.sum() / max(f.sum(), 1) for h, f in zip(face & covered, face)]))
    return result


COUNTS = ("faces", "occluded_faces")  # summed over pairs; every other number is averaged


def _mean_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rows' numbers averaged (weighted by their faces; None where a row has none), nested dicts alike."""
    out: dict[str, Any] = {key: sum(r[key] for r in rows) for key in COUNTS if key in rows[0]}
    for key, value in rows[0].items():
        if isinstance(value, dict):
            out[key] = _mean_of([{"faces": r["faces"], **r[key]} for r in rows])
            out[key].pop("faces")
        elif key not in COUNTS and (value is None or isinstance(value, (int, float))):
            known = [r for r in rows if r[key] is not None]
            out[key] = (float(sum(r[key] * r["faces"] for r in known) / sum(r["faces"] for r in known))
                        if known else None)
    return out


def synthetic_occlusion(bundle_dir: str | os.PathLike, count: int = HELD_OUT_POSES, poses_seed: int = HELD_OUT_SEED,
                        seed: int = OCCLUSION_SEED) -> dict[str, Any]:
    """Scores on `count` held-out poses (synth.test_poses) of each identity of a bundle trained on synthetic faces,
    swapped to every other target; ValueError when the bundle has no synthetic ground truth."""
    runner = SwapRunner(bundle_dir)
    _, known = synth_identities(runner.manifest)
    size, poses = runner.manifest.resolution, synth.test_poses(count, poses_seed)
    rows = []
    for a in runner.manifest.identities:
        rendered = [synth.render(known[a], pose, size) for pose in poses]
        faces, masks = np.stack([r[0] for r in rendered]), np.stack([r[1] for r in rendered])
        for b in sorted(t for t in runner.manifest.targets if t != a):
            rows.append({"source": a, "target": b,
                         **score_faces(runner, b, faces, masks, alignment.DEFAULT_MARGIN, seed=seed)})
    return {**_mean_of(rows), "seed": seed, "poses_seed": poses_seed, "pairs": rows}


def real_occlusion(bundle_dir: str | os.PathLike, data_dir: str | os.PathLike, limit: int = HELD_OUT_POSES,
                   seed: int = OCCLUSION_SEED, identity_map: dict[str, str] | None = None) -> dict[str, Any]:
    """Scores on up to `limit` faces (spread over the set) of each identity of an extracted data set that is one of
    the bundle's (after identity_map: data identity -> bundle identity), swapped to every other target; ValueError
    when there is none."""
    from facetwin.training.data import load_faces, load_index

    runner = SwapRunner(bundle_dir)
    size = runner.manifest.resolution
    margin = float(load_index(data_dir).get("margin", alignment.DEFAULT_MARGIN))
    loaded = load_faces(data_dir, resolution=size, regions=False)
    mapped = {(identity_map or {}).get(name, name): data for name, data in loaded.items()}
    rows = []
    for a, data in mapped.items():
        if a not in runner.manifest.identities:
            continue
        keep = quality.evenly(len(data), limit)
        faces = data.faces[keep].permute(0, 2, 3, 1).numpy()
        masks = data.masks[keep, 0].numpy()
        for b in sorted(t for t in runner.manifest.targets if t != a):
            rows.append({"source": a, "target": b, **score_faces(runner, b, faces, masks, margin, seed=seed)})
    if not rows:
        raise ValueError(f"none of the data set's identities {sorted(mapped)} is one of the bundle's "
                         f"{list(runner.manifest.identities)} with another target to swap to")
    return {**_mean_of(rows), "seed": seed, "data": str(data_dir), "pairs": rows}


def occlusion_report(bundle_dir: str | os.PathLike, real_data: str | os.PathLike | None = None,
                     count: int = HELD_OUT_POSES) -> dict[str, Any]:
    """{"bundle", "synthetic", "real", "reasons"}: a section that cannot be computed is None with its reason."""
    report: dict[str, Any] = {"bundle": str(bundle_dir), "rules": list(blending.PASTE_MASKS), "reasons": {}}
    try:
        report["synthetic"] = synthetic_occlusion(bundle_dir, count)
    except ValueError as exc:
        report["synthetic"], report["reasons"]["synthetic"] = None, str(exc)
    if real_data is None:
        report["real"], report["reasons"]["real"] = None, "no real faces given"
    else:
        try:
            report["real"] = real_occlusion(bundle_dir, Path(real_data), count)
        except ValueError as exc:
            report["real"], report["reasons"]["real"] = None, str(exc)
    return report


def grid_rows(bundle_dir: str | os.PathLike, faces: np.ndarray, masks: np.ndarray, target: str,
              margin: float = alignment.DEFAULT_MARGIN, rule: str = blending.PASTE_MASK) -> list[tuple[str, np.ndarray]]:
    """Rows for evaluate.compose_grid: the occluded faces, the model's masks, the served face by the hull alone and
    by `rule`: what the numbers mean, to look at."""
    runner = SwapRunner(bundle_dir)
    occluded, _ = with_occluders(faces, masks)
    swapped, model_masks = runner.swap(occluded, target)
    swapped = np.round(swapped * 255.0).astype(np.uint8)
    landmarker = quality._server_landmarker()
    served = {name: [] for name in ("hull", rule)}
    for crop, new, mask in zip(occluded, swapped, model_masks):
        points = landmarker.crop_landmarks(crop, margin)
        hull = blending.face_mask(crop.shape[0], points, margin)
        for name in served:
            served[name].append(quality.blend_like_server(crop, new, hull, points, margin,
                                                          crop_landmarks=landmarker.crop_landmarks,
                                                          model_mask=mask, paste_mask=name))
    mask_rgb = np.repeat((model_masks[..., None] * 255.0 + 0.5).astype(np.uint8), 3, axis=-1)
    return [("occluded", occluded), ("model mask", mask_rgb), ("paste: hull", np.stack(served["hull"])),
            (f"paste: {rule}", np.stack(served[rule]))]


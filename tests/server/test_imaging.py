"""Pure image functions: decode/validate/encode round trips and the errors callers see."""

import cv2
import numpy as np
import pytest

from facetwin.server import imaging
from facetwin.server.errors import InvalidInputError, ResourceExhaustedError


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)


def test_png_round_trip_is_lossless_and_rgb(rgb):
    data = imaging.encode(rgb, "png")
    assert data[:4] == b"\x89PNG"
    np.testing.assert_array_equal(imaging.decode_encoded(data, 4096), rgb)
    # The file is a normal PNG: OpenCV reads it back as BGR.
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), rgb[:, :, ::-1])


def test_jpeg_round_trip_is_close(rgb):
    smooth = cv2.GaussianBlur(rgb, (9, 9), 3)
    decoded = imaging.decode_encoded(imaging.encode(smooth, "jpeg", jpeg_quality=95), 4096)
    assert np.abs(decoded.astype(int) - smooth).mean() < 4


def test_raw_respects_colour_order(rgb):
    as_bgr = imaging.decode_raw(rgb[:, :, ::-1].tobytes(), 24, 32, 3, "bgr", "uint8", 4096)
    np.testing.assert_array_equal(as_bgr, rgb)
    raw_out = imaging.encode(rgb, "raw", "bgr")
    np.testing.assert_array_equal(np.frombuffer(raw_out, np.uint8).reshape(24, 32, 3), rgb[:, :, ::-1])


@pytest.mark.parametrize(
    "pixels, h, w, c, dtype, match",
    [
        (b"\0" * 10, 24, 32, 3, "uint8", "holds 10 bytes"),
        (b"\0" * (24 * 32), 24, 32, 1, "uint8", "channels is 1"),
        (b"\0" * (24 * 32 * 3 * 4), 24, 32, 3, "float32", "PIXEL_TYPE_UINT8"),
        (b"\0" * (4 * 4 * 3), 4, 4, 3, "uint8", "at least 8"),
    ],
)
def test_raw_validation_messages(pixels, h, w, c, dtype, match):
    with pytest.raises(InvalidInputError, match=match):
        imaging.decode_raw(pixels, h, w, c, "rgb", dtype, 4096)


def test_corrupt_and_empty_bytes_are_invalid():
    with pytest.raises(InvalidInputError, match="not a decodable JPEG or PNG"):
        imaging.decode_encoded(b"definitely not an image", 4096)
    with pytest.raises(InvalidInputError, match="empty"):
        imaging.decode_encoded(b"", 4096)


def test_oversize_image_is_resource_exhausted(rgb):
    with pytest.raises(ResourceExhaustedError, match="at most 16"):
        imaging.decode_encoded(imaging.encode(rgb, "png"), 16)


def test_batch_layout_round_trip(rgb):
    faces = [rgb, rgb[::-1].copy()]
    batch = imaging.to_nchw_float(faces)
    assert batch.shape == (2, 3, 24, 32) and batch.dtype == np.float32
    assert 0.0 <= batch.min() and batch.max() <= 1.0
    np.testing.assert_array_equal(imaging.to_hwc_uint8(batch), np.stack(faces))


def test_resize_is_identity_at_same_size(rgb):
    assert imaging.resize(rgb, 24, 32) is rgb
    assert imaging.resize(rgb, 12, 16).shape == (12, 16, 3)
    assert imaging.resize(rgb, 48, 64).shape == (48, 64, 3)

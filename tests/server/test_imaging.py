"""Pure image functions: decode/validate/encode round trips and the errors callers see."""

import struct
import zlib

import cv2
import numpy as np
import pytest

from facetwin.server import imaging
from facetwin.server.errors import InvalidInputError, ResourceExhaustedError

LIMITS = imaging.ImageLimits()


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)


def test_png_round_trip_is_lossless_and_rgb(rgb):
    data = imaging.encode(rgb, "png")
    assert data[:4] == b"\x89PNG"
    np.testing.assert_array_equal(imaging.decode_encoded(data, LIMITS), rgb)
    # The file is a normal PNG: OpenCV reads it back as BGR.
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), rgb[:, :, ::-1])


def test_jpeg_round_trip_is_close(rgb):
    smooth = cv2.GaussianBlur(rgb, (9, 9), 3)
    decoded = imaging.decode_encoded(imaging.encode(smooth, "jpeg", jpeg_quality=95), LIMITS)
    assert np.abs(decoded.astype(int) - smooth).mean() < 4


def test_raw_respects_colour_order(rgb):
    as_bgr = imaging.decode_raw(rgb[:, :, ::-1].tobytes(), 24, 32, 3, "bgr", "uint8", LIMITS)
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
        imaging.decode_raw(pixels, h, w, c, "rgb", dtype, LIMITS)


def test_corrupt_and_empty_bytes_are_invalid():
    with pytest.raises(InvalidInputError, match="not a JPEG or PNG file"):
        imaging.decode_encoded(b"definitely not an image", LIMITS)
    with pytest.raises(InvalidInputError, match="empty"):
        imaging.decode_encoded(b"", LIMITS)


def test_oversize_image_is_resource_exhausted(rgb):
    with pytest.raises(ResourceExhaustedError, match="at most 16"):
        imaging.decode_encoded(imaging.encode(rgb, "png"), imaging.ImageLimits(16, 4096))


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height and which holds a single tiny compressed row: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height", [(16000, 16000), (100000, 100000), (5000, 10)])
def test_limits_are_read_from_the_header_before_decoding(width, height):
    with pytest.raises(ResourceExhaustedError, match="downscale it first"):
        imaging.decode_encoded(_png_header(width, height), LIMITS)


def test_the_pixel_limit_holds_below_the_side_limit(rgb):
    with pytest.raises(ResourceExhaustedError, match="768 pixels; this server accepts at most 700"):
        imaging.decode_encoded(imaging.encode(rgb, "png"), imaging.ImageLimits(4096, 700))
    with pytest.raises(ResourceExhaustedError, match="at most 700"):
        imaging.decode_raw(rgb.tobytes(), 24, 32, 3, "rgb", "uint8", imaging.ImageLimits(4096, 700))


@pytest.mark.parametrize("extension", [".bmp", ".webp", ".tiff", ".jp2", ".hdr", ".ppm"])
def test_formats_other_than_jpeg_and_png_are_refused_by_name(rgb, extension):
    ok, encoded = cv2.imencode(extension, rgb if extension != ".hdr" else rgb.astype(np.float32) / 255)
    if not ok:
        pytest.skip(f"this OpenCV cannot write {extension}")
    with pytest.raises(InvalidInputError, match="accepts jpeg or png"):
        imaging.decode_encoded(encoded.tobytes(), LIMITS)


def test_a_gif_is_refused_by_name():
    gif = b"GIF89a" + struct.pack("<HH", 16, 16) + b"\x00\x00\x00;"
    with pytest.raises(InvalidInputError, match="accepts jpeg or png"):
        imaging.decode_encoded(gif, LIMITS)


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_a_truncated_file_is_invalid_not_internal(rgb, kind):
    data = imaging.encode(rgb, kind)
    with pytest.raises(InvalidInputError):
        imaging.decode_encoded(data[: len(data) // 2], LIMITS)


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_a_file_with_a_broken_header_says_so(rgb, kind):
    data = bytearray(imaging.encode(rgb, kind))
    if kind == "png":
        data[24] = 7  # IHDR's bit depth: no PNG has 7
    else:
        data = data[:4] + b"\x00" * 40  # a JPEG signature and no segment after it
    with pytest.raises(InvalidInputError, match=f"starts like a {kind.upper()} file but its header cannot be read"):
        imaging.decode_encoded(bytes(data), LIMITS)


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

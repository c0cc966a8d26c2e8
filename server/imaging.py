"""Pure image functions on numpy arrays: decode, validate, resize, batch layout, encode.

Everything here takes and returns RGB uint8 HWC arrays unless it says otherwise; colour order is converted
only at the edges (decode_raw / encode). Limits are checked before any pixel is decoded: an encoded image's size
comes from its header (a 0.75 MB PNG can claim 16000 x 16000 pixels, 730 MB decoded).
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InvalidInputError, ResourceExhaustedError

MIN_SIDE = 8  # smaller images carry no usable face
FORMATS = ("jpeg", "png")  # what Image.encoded may hold
_PIL_FORMATS = ["JPEG", "PNG"]
_SIGNATURES = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}
# Pillow's own decompression-bomb guard is redundant here (ImageLimits is checked on the header first) and would
# warn for large but allowed images; its error, for absurd headers, is still caught below.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """The largest image the server decodes (ServerConfig.max_image_side / max_image_pixels)."""

    max_side: int = 4096
    max_pixels: int = 4096 * 4096


def check_size(height: int, width: int, limits: ImageLimits) -> None:
    if height < MIN_SIDE or width < MIN_SIDE:
        raise InvalidInputError(f"image is {width}x{height}; both sides must be at least {MIN_SIDE} pixels")
    if height > limits.max_side or width > limits.max_side:
        raise ResourceExhaustedError(f"image is {width}x{height}; this server accepts at most {limits.max_side} "
                                     "pixels per side: downscale it first")
    if height * width > limits.max_pixels:
        raise ResourceExhaustedError(f"image is {width}x{height} = {height * width} pixels; this server accepts at "
                                     f"most {limits.max_pixels}: downscale it first")


def probe_encoded(data: bytes, limits: ImageLimits) -> tuple[str, int, int]:
    """(format, height, width) of JPEG/PNG bytes, format "jpeg" | "png", the size checked against the limits from
    the header alone (as stored: an EXIF orientation may turn the decoded image)."""
    if not data:
        raise InvalidInputError("image.encoded is empty: send JPEG or PNG file bytes, or use image.raw")
    try:
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as header:  # reads the header, decodes nothing
            width, height = header.size
            kind = header.format.lower()
    except Image.DecompressionBombError:
        raise ResourceExhaustedError(f"image.encoded claims more than {Image.MAX_IMAGE_PIXELS} pixels; this server "
                                     f"accepts at most {limits.max_pixels}: downscale it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):  # Pillow's errors for unreadable headers
        signature = next((name for name, magic in _SIGNATURES.items() if data.startswith(magic)), None)
        if signature is not None:
            raise InvalidInputError(f"image.encoded ({len(data)} bytes) starts like a {signature} file but its header "
                                    "cannot be read: the file is truncated or corrupt") from None
        raise InvalidInputError(f"image.encoded ({len(data)} bytes, starting {data[:8].hex()}) is not a JPEG or PNG "
                                f"file: this server accepts {' or '.join(FORMATS)} (or image.raw pixels)") from None
    check_size(height, width, limits)
    return kind, height, width


def decode_encoded(data: bytes, limits: ImageLimits) -> np.ndarray:
    """JPEG/PNG bytes -> RGB uint8 (H, W, 3); the header is checked first (probe_encoded)."""
    probe_encoded(data, limits)
    return decode_probed(data)


def decode_probed(data: bytes) -> np.ndarray:
    """decode_encoded for bytes whose header probe_encoded has already checked."""
    try:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        bgr = None
    if bgr is None:
        raise InvalidInputError(f"image.encoded ({len(data)} bytes) has a valid header but its pixels cannot be "
                                "decoded: the file is truncated or corrupt")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_raw(pixels: bytes, height: int, width: int, channels: int, color: str, dtype: str,
               limits: ImageLimits) -> np.ndarray:
    """Raw HWC bytes with an explicit shape -> RGB uint8 (H, W, 3)."""
    if dtype != "uint8":
        raise InvalidInputError(f"image.raw.pixel_type {dtype} is not supported: send PIXEL_TYPE_UINT8 (0..255)")
    if channels != 3:
        raise InvalidInputError(f"image.raw.channels is {channels}; send 3-channel colour (RGB or BGR) images")
    expected = height * width * channels
    if len(pixels) != expected:  # before the size: a shape that disagrees with its bytes is the mistake to report
        raise InvalidInputError(
            f"image.raw.pixels holds {len(pixels)} bytes but height*width*channels = {height}*{width}*{channels} = {expected}"
        )
    check_size(height, width, limits)
    image = np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, channels)
    return image[:, :, ::-1] if color == "bgr" else image


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes with the interpolation that suits the direction (area down, cubic up); no-op at the same size."""
    if image.shape[0] == height and image.shape[1] == width:
        return image
    shrinking = image.shape[0] > height or image.shape[1] > width
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def to_nchw_float(faces: list[np.ndarray]) -> np.ndarray:
    """List of RGB uint8 (R, R, 3) -> float32 (B, 3, R, R) in [0, 1]: the bundle's input layout."""
    batch = np.stack(faces).astype(np.float32)
    batch *= 1.0 / 255.0
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def to_hwc_uint8(batch: np.ndarray) -> np.ndarray:
    """float (B, C, R, R) in [0, 1] -> uint8 (B, R, R, C), rounded and clipped."""
    scaled = np.clip(batch.astype(np.float32, copy=False) * 255.0 + 0.5, 0, 255)
    return np.ascontiguousarray(scaled.astype(np.uint8).transpose(0, 2, 3, 1))


def encode(image: np.ndarray, encoding: str, color: str = "rgb", jpeg_quality: int = 90) -> bytes:
    """RGB (or single-channel) uint8 -> PNG/JPEG file bytes, or raw HWC bytes in the given colour order."""
    if image.ndim == 3 and (encoding != "raw" or color == "bgr"):
        # OpenCV's encoders want BGR, and so does a caller asking for raw BGR.
        image = image[:, :, ::-1]
    if encoding == "raw":
        return np.ascontiguousarray(image).tobytes()
    if encoding == "png":
        ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    elif encoding == "jpeg":
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    else:
        raise InvalidInputError(f"output encoding {encoding!r} is not one of raw, png, jpeg")
    if not ok:
        raise InvalidInputError(f"could not encode the result as {encoding}")
    return buf.tobytes()

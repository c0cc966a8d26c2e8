"""Pure image functions on numpy arrays: decode, validate, resize, batch layout, encode.

Everything here takes and returns RGB uint8 HWC arrays unless it says otherwise; colour order is converted
only at the edges (decode_raw / encode).
"""

from __future__ import annotations

import cv2
import numpy as np

from .errors import InvalidInputError, ResourceExhaustedError

MIN_SIDE = 8  # smaller images carry no usable face
FORMATS = ("jpeg", "png")  # what Image.encoded may hold


def _check_size(height: int, width: int, max_side: int) -> None:
    if height < MIN_SIDE or width < MIN_SIDE:
        raise InvalidInputError(f"image is {width}x{height}; both sides must be at least {MIN_SIDE} pixels")
    if height > max_side or width > max_side:
        raise ResourceExhaustedError(
            f"image is {width}x{height}; this server accepts at most {max_side} pixels per side — downscale it first"
        )


def decode_encoded(data: bytes, max_side: int) -> np.ndarray:
    """JPEG/PNG bytes -> RGB uint8 (H, W, 3)."""
    if not data:
        raise InvalidInputError("image.encoded is empty: send JPEG or PNG file bytes, or use image.raw")
    buf = np.frombuffer(data, dtype=np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if bgr is None:
        raise InvalidInputError(
            f"image.encoded ({len(data)} bytes, starting {data[:8].hex()}) is not a decodable JPEG or PNG file"
        )
    _check_size(bgr.shape[0], bgr.shape[1], max_side)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_raw(pixels: bytes, height: int, width: int, channels: int, color: str, dtype: str, max_side: int) -> np.ndarray:
    """Raw HWC bytes with an explicit shape -> RGB uint8 (H, W, 3)."""
    if dtype != "uint8":
        raise InvalidInputError(f"image.raw.pixel_type {dtype} is not supported: send PIXEL_TYPE_UINT8 (0..255)")
    if channels != 3:
        raise InvalidInputError(f"image.raw.channels is {channels}; send 3-channel colour (RGB or BGR) images")
    _check_size(height, width, max_side)
    expected = height * width * channels
    if len(pixels) != expected:
        raise InvalidInputError(
            f"image.raw.pixels holds {len(pixels)} bytes but height*width*channels = {height}*{width}*{channels} = {expected}"
        )
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

"""The swap itself, as plain domain objects: decode -> fit to the model -> batch -> fit back -> encode.

No gRPC here: the servicer turns protobuf into a SwapJob and a SwapOutcome back into protobuf.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Hashable

import numpy as np

from . import imaging
from .errors import InvalidInputError, UnimplementedError
from .registry import ModelRegistry

# Images bigger than this are decoded/encoded in a worker thread so the event loop keeps serving others.
_INLINE_PIXELS = 256 * 256


@dataclasses.dataclass(frozen=True)
class RawPixels:
    """Uncompressed pixels exactly as the caller sent them."""

    data: bytes
    height: int
    width: int
    channels: int
    color: str  # "rgb" | "bgr"
    dtype: str  # "uint8" | "float32"


@dataclasses.dataclass(frozen=True)
class SwapJob:
    """One swap request."""

    model: str
    target: str
    encoded: bytes | None = None  # JPEG/PNG bytes, or
    raw: RawPixels | None = None  # raw pixels
    kind: str = "aligned_face"  # "aligned_face" | "full_frame"
    output_encoding: str = "same"  # "same" | "raw" | "png" | "jpeg"
    output_color: str | None = None  # raw output order; None = the input's order
    jpeg_quality: int = 90
    return_mask: bool = False
    frame_id: int = 0


@dataclasses.dataclass(frozen=True)
class OutputImage:
    data: bytes
    encoding: str  # "raw" | "png" | "jpeg"
    height: int
    width: int
    channels: int
    color: str


@dataclasses.dataclass(frozen=True)
class Timings:
    decode_ms: float
    queue_ms: float
    inference_ms: float
    encode_ms: float
    total_ms: float
    batch_size: int


@dataclasses.dataclass(frozen=True)
class SwapOutcome:
    image: OutputImage
    mask: OutputImage | None
    timings: Timings
    frame_id: int


class SwapEngine:
    def __init__(self, registry: ModelRegistry, max_image_side: int = 4096) -> None:
        self.registry = registry
        self.max_image_side = max_image_side

    async def swap(self, job: SwapJob, caller: Hashable, wait_s: float | None = None) -> SwapOutcome:
        start = time.perf_counter()
        if job.kind == "full_frame":
            raise UnimplementedError("full-frame swaps are not in this release; send an aligned face crop")
        if not 1 <= job.jpeg_quality <= 100:
            raise InvalidInputError(f"jpeg_quality {job.jpeg_quality} must be in 1..100")
        _, target = await self.registry.get(job.model, job.target, timeout=wait_s)

        decoded = await self._maybe_in_thread(self._decode, job)
        height, width = decoded.shape[:2]
        size = target.backend.manifest.resolution
        face = imaging.resize(decoded, size, size)
        decoded_at = time.perf_counter()

        (swapped, mask), info = await target.batcher.submit(face, caller)

        encoded_at = time.perf_counter()
        image, mask_out = await self._maybe_in_thread(self._encode, job, swapped, mask, height, width)
        done = time.perf_counter()
        timings = Timings(
            decode_ms=(decoded_at - start) * 1e3,
            queue_ms=info.queue_s * 1e3,
            inference_ms=info.inference_s * 1e3,
            encode_ms=(done - encoded_at) * 1e3,
            total_ms=(done - start) * 1e3,
            batch_size=info.size,
        )
        return SwapOutcome(image, mask_out, timings, job.frame_id)

    async def _maybe_in_thread(self, fn, *args):
        job = args[0]
        pixels = job.raw.height * job.raw.width if job.raw else len(job.encoded or b"") * 4
        if pixels > _INLINE_PIXELS:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def _decode(self, job: SwapJob) -> np.ndarray:
        if job.raw is not None:
            r = job.raw
            return imaging.decode_raw(r.data, r.height, r.width, r.channels, r.color, r.dtype, self.max_image_side)
        if job.encoded is not None:
            return imaging.decode_encoded(job.encoded, self.max_image_side)
        raise InvalidInputError("request has no image: set image.encoded (JPEG/PNG bytes) or image.raw")

    def _encode(
        self, job: SwapJob, swapped: np.ndarray, mask: np.ndarray, height: int, width: int
    ) -> tuple[OutputImage, OutputImage | None]:
        encoding = job.output_encoding
        if encoding == "same":
            encoding = "raw" if job.raw is not None else "png"
        color = job.output_color or (job.raw.color if job.raw is not None else "rgb")
        swapped = imaging.resize(swapped, height, width)
        image = OutputImage(imaging.encode(swapped, encoding, color, job.jpeg_quality), encoding, height, width, 3, color)
        mask_out = None
        if job.return_mask:
            mask = imaging.resize(mask, height, width)
            mask_encoding = "png" if encoding == "jpeg" else encoding  # masks stay lossless
            mask_out = OutputImage(imaging.encode(mask, mask_encoding), mask_encoding, height, width, 1, color)
        return image, mask_out

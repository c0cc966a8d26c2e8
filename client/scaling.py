"""Whole frames larger than a server takes: sent scaled down by a whole factor k, answered as the changed region with
its blend mask, and blended back into the caller's full-resolution frame.

A 4K frame sent raw is 24.9 MB, over facetwin-server's default 16 MiB messages, and a 8064x6048 phone photo is over
its 4096 pixels a side. The swap itself works at the model's resolution (a few hundred pixels a face), so a frame
sent at 1/k loses little; what must not suffer is the rest of the picture. The answer's region is therefore scaled
up and blended in through its own mask, out = original * (1 - A) + up(region) * A: every pixel the swap did not touch
(A = 0) is the caller's own, exactly.

numpy only: the base SDK has no image library. Downscaling is a box average (each sent pixel is the mean of k x k
pixels); upscaling is bilinear, centred on those boxes, so the faces' edges stay smooth.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from .types import DetectedFace, SwapResult

__all__ = ["FrameLimits", "ScaledFrame", "fit_scale", "downscale", "upscale", "plan_frame"]

MIB = 2**20
_MIN_SIDE = 8  # the server refuses smaller images
RAW_BYTES_PER_PIXEL = 3  # RGB: a frame sent raw, and what any encoding of it may come near
# The scaled answer is the changed region and its mask: at most the whole frame, 3 + 1 bytes a pixel.
_ANSWER_BYTES_PER_PIXEL = 4


@dataclasses.dataclass(frozen=True)
class FrameLimits:
    """The limits a whole frame sent as an array must fit (0 = none for each)."""

    message_bytes: int  # the smaller of the server's and this client's largest message
    max_side: int  # the server's largest image side, pixels
    max_pixels: int  # the server's largest image area, pixels
    frame_memory_bytes: int  # the server's decoded-image memory: one image larger is refused
    client_limits: bool = False  # message_bytes is this client's max_message_mb, not the server's

    @classmethod
    def from_server(cls, limits: Mapping[str, object], client_message_bytes: int) -> "FrameLimits":
        """From ServerInfo.limits and the client's own message limit."""
        server_bytes = int(limits.get("max_message_bytes") or 0)
        smaller_here = not server_bytes or client_message_bytes < server_bytes
        return cls(message_bytes=client_message_bytes if smaller_here else server_bytes,
                   max_side=int(limits.get("max_image_side") or 0), max_pixels=int(limits.get("max_image_pixels") or 0),
                   frame_memory_bytes=int(limits.get("max_frame_memory_bytes") or 0), client_limits=smaller_here)

    def over(self, height: int, width: int, message: int) -> str:
        """Why a height x width image sent in a message of `message` bytes does not fit ("" when it does)."""
        if self.max_side and max(height, width) > self.max_side:
            return f"over the server's {self.max_side} pixels per side"
        if self.max_pixels and height * width > self.max_pixels:
            return f"over the server's {self.max_pixels} pixels per image"
        if self.message_bytes and message > self.message_bytes:
            whose = "this client's max_message_mb" if self.client_limits else "the server's"
            return f"larger than {whose} {self.message_bytes / MIB:g} MiB messages"
        if self.frame_memory_bytes and height * width * RAW_BYTES_PER_PIXEL > self.frame_memory_bytes:
            return f"larger than the server's {self.frame_memory_bytes / MIB:g} MiB frame memory"
        return ""


def fit_scale(height: int, width: int, limits: FrameLimits, headroom: int) -> tuple[int, str]:
    """(1, "") when a height x width frame fits as it is; else the smallest k > 1 at which it fits (its answer, the
    changed region and its mask, included) and why it did not. k is 0 when no scale fits (the limits leave less than
    an 8 pixel side)."""
    reason = limits.over(height, width, height * width * RAW_BYTES_PER_PIXEL + headroom)
    if not reason:
        return 1, ""
    k = 2
    while min(math.ceil(height / k), math.ceil(width / k)) >= _MIN_SIDE:
        rows, cols = math.ceil(height / k), math.ceil(width / k)
        if not limits.over(rows, cols, rows * cols * _ANSWER_BYTES_PER_PIXEL + headroom):
            return k, reason
        k += 1
    return 0, reason


def downscale(image: np.ndarray, k: int) -> np.ndarray:
    """uint8 (H, W, C) -> (ceil(H/k), ceil(W/k), C), each pixel the mean of a k x k box. The edge is padded by
    repeating its last row and column, so a side that is not a multiple of k loses nothing."""
    height, width = image.shape[:2]
    pad_y, pad_x = -height % k, -width % k
    if pad_y or pad_x:
        image = np.pad(image, ((0, pad_y), (0, pad_x), (0, 0)), mode="edge")
    rows, cols = image.shape[0] // k, image.shape[1] // k
    # k * k strided adds into a small integer accumulator, several times faster than a reshape and a sum over two
    # axes, which walks memory in a poor order (a 4K frame at k = 2: ~330 ms that way on one core).
    sums = np.zeros((rows, cols, image.shape[2]), np.uint16 if k * k * 255 <= 0xFFFF else np.uint32)
    for dy in range(k):
        for dx in range(k):
            sums += image[dy::k, dx::k]
    sums += k * k // 2
    if k & (k - 1) == 0:  # a power of two: the division is a shift
        sums >>= 2 * (k.bit_length() - 1)
    else:
        sums //= k * k
    return sums.astype(np.uint8)  # the mean, rounded


def _axis(small: int, full: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of `full` pixels: the two sent pixels around it and the weight of the second. Sent pixel i stands for
    full pixels i*k .. i*k+k-1, so its centre is at full coordinate i*k + (k-1)/2."""
    position = np.clip((np.arange(full) + 0.5) / k - 0.5, 0, small - 1)
    first = np.floor(position).astype(np.intp)
    second = np.minimum(first + 1, small - 1)
    return first, second, (position - first).astype(np.float32)


def upscale(image: np.ndarray, k: int, height: int, width: int) -> np.ndarray:
    """(h, w) or (h, w, C) -> float32 (height, width[, C]), bilinear: the inverse placement of downscale."""
    data = image.astype(np.float32)
    top, bottom, fy = _axis(data.shape[0], height, k)
    fy = fy.reshape(-1, *([1] * (data.ndim - 1)))
    rows = data[top] * (1 - fy) + data[bottom] * fy
    left, right, fx = _axis(data.shape[1], width, k)
    fx = fx.reshape(1, -1, *([1] * (data.ndim - 2)))
    return rows[:, left] * (1 - fx) + rows[:, right] * fx


@dataclasses.dataclass(frozen=True, eq=False)
class ScaledFrame:
    """A frame sent at 1/k: `small` goes to the server (asking for its region and mask); finish() turns the answer
    into the full-resolution result."""

    original: np.ndarray  # the caller's frame, uint8 (H, W, 3)
    small: np.ndarray  # what is sent
    k: int
    reason: str  # why it was scaled, e.g. "larger than the server's 16 MiB messages"

    @property
    def note(self) -> str:
        return f"sent at 1/{self.k} scale: {self.reason}"

    def finish(self, result: SwapResult, want_mask: bool) -> SwapResult:
        """The answer to `small` (a whole-frame result with its mask, as result_from_response gives it) -> the
        answer to `original`: the region scaled up and blended in through its mask, faces in full-frame pixels."""
        if result.image is None:  # dropped or failed: nothing to blend
            return dataclasses.replace(result, sent_scale=self.k, scale_note=self.note)
        height, width = self.original.shape[:2]
        image = self.original.copy()
        mask = np.zeros((height, width), np.uint8) if want_mask else None
        region = None
        if result.region is not None:
            x0, y0, x1, y1 = result.region
            full = (x0 * self.k, y0 * self.k, min(x1 * self.k, width), min(y1 * self.k, height))
            fx0, fy0, fx1, fy1 = full
            if result.mask is None:
                raise ValueError("the answer to a scaled frame carries no mask")
            alpha = upscale(result.mask[y0:y1, x0:x1], self.k, fy1 - fy0, fx1 - fx0) * (1 / 255)
            swapped = upscale(result.image[y0:y1, x0:x1], self.k, fy1 - fy0, fx1 - fx0)
            own = image[fy0:fy1, fx0:fx1].astype(np.float32)
            weight = alpha[..., None]
            # Where the mask is 0 this is own * 1 + swapped * 0: the caller's pixel, exactly.
            image[fy0:fy1, fx0:fx1] = np.rint(own * (1 - weight) + swapped * weight).clip(0, 255).astype(np.uint8)
            if mask is not None:
                mask[fy0:fy1, fx0:fx1] = np.rint(alpha * 255).clip(0, 255).astype(np.uint8)
            region = full
        faces = tuple(_scaled_face(face, self.k) for face in result.faces)
        return dataclasses.replace(result, image=image, mask=mask, region=region, faces=faces, sent_scale=self.k,
                                   scale_note=self.note)


def _scaled_face(face: DetectedFace, k: int) -> DetectedFace:
    """A face found in the frame sent at 1/k, in the caller's frame's pixels: box edges scale by k; points are pixel
    centres, and sent pixel i's centre is at (k - 1) / 2 past i*k."""
    box = tuple(int(edge) * k for edge in face.box)
    points = None if face.landmarks is None else (face.landmarks * k + (k - 1) / 2).astype(np.float32)
    return dataclasses.replace(face, box=box, landmarks=points)


def plan_frame(image: np.ndarray, limits: FrameLimits | None, headroom: int) -> ScaledFrame | None:
    """The scaled frame to send for a whole frame over `limits`; None when it fits as it is (or the limits are not
    known, or nothing would fit: the server then says what is wrong)."""
    if limits is None or not isinstance(image, np.ndarray) or image.ndim != 3 or image.dtype != np.uint8:
        return None
    k, reason = fit_scale(image.shape[0], image.shape[1], limits, headroom)
    if k < 2:
        return None
    return ScaledFrame(original=image, small=downscale(image, k), k=k, reason=reason)

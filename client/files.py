"""Swap photo and video files through a server: the SDK side of `facetwin swap`, sync and asyncio.

    from facetwin.client import Client, swap_image_file, swap_video_file

    with Client("localhost:50051") as client:
        swap_image_file(client, "photo.jpg", "out.jpg", "demo", "bob")        # whole photo, largest face
        report = swap_video_file(client, "clip.mp4", "out.mp4", "demo", "bob", faces="all")
        print(report.frames, report.frames_with_faces)

Outputs are written to a hidden temporary file next to the output and renamed into place when complete, so an
error, a cancel or Ctrl-C leaves no half-written file. PNG and JPEG photos need only the base install; other photo
formats and every video need PyAV (pip install 'facetwin[cli]').

A photo larger than the server takes (its side, its area, its file over the message limit) is decoded here, sent
scaled down like any whole frame over the limits (see facetwin.client.scaling), and the result is encoded here at
the photo's full size, with the same synthetic-media mark the server writes; that needs PyAV too.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from facetwin.v1.provenance import mark_synthetic

from .client import AsyncClient, Client
from .errors import AnswerTooLargeError, MediaFileError, ServerError
from .images import FacesArg, request_headroom
from .media import (
    PartialFile,
    decode_image,
    decode_photo,
    encode_image,
    output_encoding,
    photo_size,
    read_image,
)
from .scaling import RAW_BYTES_PER_PIXEL, FrameLimits, fit_scale
from .types import FileReport, SwapResult, face_counts
from .video import VideoJob, VideoOptions

__all__ = ["swap_image_file", "swap_image_file_async", "swap_video_file", "swap_video_file_async", "photo_scale"]

PathLike = str | os.PathLike
_SERVER_JPEG_QUALITY = 90  # what the server encodes with when no quality is given


def photo_scale(payload: bytes, limits: FrameLimits | None, faces: FacesArg, output: str = "jpeg",
                mask: bool = False) -> tuple[int, str]:
    """(1, "") when a photo's PNG/JPEG bytes go to the server as they are; else (k, why) to decode it here, send its
    pixels at 1/k (1: as they are, answered by the changed region only) and encode the answer here (0: no scale
    fits). output: the answer's encoding ("png" or "jpeg"); mask: whether a mask is answered too. An aligned crop
    (faces=None) is never scaled."""
    size = photo_size(payload)
    if limits is None or faces is None or size is None:
        return 1, ""
    width, height = size
    headroom = request_headroom(faces, color="rgb")
    if file_over := limits.over(height, width, len(payload) + headroom):
        k = fit_scale(height, width, limits, headroom)[0]
        return k, f"its file is {file_over}" if k == 1 else file_over
    if output == "png":
        # A PNG answer's size is known only once the server has encoded it, and a photo's comes near its raw size
        # (a JPEG sent is often a tenth of that): a 12 MP phone JPEG fits a 16 MiB message, its PNG answer does not.
        # Pixels sent need not bring the whole picture back, only the changed region.
        if answer_over := limits.over(height, width, height * width * (RAW_BYTES_PER_PIXEL + mask) + headroom):
            return fit_scale(height, width, limits, headroom)[0], f"its PNG answer could be {answer_over}"
    return 1, ""


class _ImageJob:
    """One photo: read and checked at creation (the outputs' temporary files too), written by finish()."""

    def __init__(self, source: PathLike, output: PathLike, mask: PathLike | None) -> None:
        self.started = time.perf_counter()
        self.source, self.output = Path(source), Path(output)
        self.encoding = output_encoding(self.output)
        self.mask = Path(mask) if mask is not None else None
        if self.mask is not None and self.mask.resolve() == self.output.resolve():
            raise MediaFileError(self.mask, "is also the output: give the mask a file of its own (the mask would "
                                            "replace the swapped photo)")
        self.mask_encoding = output_encoding(self.mask, "mask") if self.mask is not None else None
        self.payload = read_image(self.source)
        self.partials = [PartialFile(self.output, self.source)]
        if self.mask is not None:
            self.partials.append(PartialFile(self.mask, self.source))

    def pixels(self, limits: FrameLimits | None, faces: FacesArg) -> object:
        """What to send: the file's PNG/JPEG bytes, or, for a photo over the server's limits, its pixels decoded here
        (the SDK sends them scaled)."""
        if not photo_scale(self.payload, limits, faces, self.encoding, self.mask is not None)[1]:
            return self.payload
        return decode_photo(self.source)

    def retry_as_pixels(self, error: AnswerTooLargeError, sent: object, faces: FacesArg) -> object:
        """After the server swapped the photo's bytes but could not send its encoded answer (a noisy photo at a high
        JPEG quality can come out larger than the file sent): its pixels, decoded here, to send instead. A whole
        frame sent as pixels is answered with the changed region only, and encoded here. Re-raises otherwise."""
        if sent is not self.payload or faces is None:
            raise error
        return decode_photo(self.source)

    def finish(self, result: SwapResult, aligned: bool, quality: int | None = None) -> FileReport:
        if result.image is not None:  # sent as pixels: encoded here, at the photo's own size
            image = encode_image(result.image, self.encoding, quality=quality or _SERVER_JPEG_QUALITY)
            manifest = result.provenance.manifest_sha256 if result.provenance is not None else ""
            self.partials[0].write(mark_synthetic(image, self.encoding, manifest))
            if self.mask is not None:
                self.partials[1].write(encode_image(result.mask, self.mask_encoding))
        else:
            self._write_encoded(result)
        for partial in self.partials:
            partial.commit()
        with_face, swapped, found = face_counts(result, aligned)
        return FileReport(
            input=str(self.source), output=str(self.output), kind="image", frames=1, frames_with_faces=with_face,
            faces_swapped=swapped, max_faces=found, seconds=time.perf_counter() - self.started,
            sent_scale=result.sent_scale, scale_note=result.scale_note,
        )

    def _write_encoded(self, result: SwapResult) -> None:
        if result.encoded is None:
            raise ServerError(grpc.StatusCode.INTERNAL, f"the server returned no {self.encoding} image")
        self.partials[0].write(result.encoded)
        if self.mask is not None:
            if result.encoded_mask is None:
                raise ServerError(grpc.StatusCode.INTERNAL, "the server returned no mask")
            mask = result.encoded_mask
            if self.mask_encoding != self.encoding:  # the server encodes the mask like the image
                mask = encode_image(decode_image(mask, grey=True), self.mask_encoding)
            self.partials[1].write(mask)

    def abort(self) -> None:
        for partial in self.partials:
            partial.discard()


def swap_image_file(
    client: Client, source: PathLike, output: PathLike, model: str, target: str, *,
    faces: FacesArg = "largest", keep_shape: float | None = None, quality: int | None = None,
    mask: PathLike | None = None, timeout: float | None = None,
) -> FileReport:
    """Swaps the faces of one photo file and writes the result; .png or .jpg/.jpeg on `output` picks the encoding.

    faces: "largest" (default), "all" or an index (largest first) for an ordinary photo; None when the photo is
    an aligned face crop. keep_shape: 0 (the target's face shape) .. 1 (the original's); None = the server's.
    quality: JPEG quality 1..100 (None = the server's 90). mask: also write the blend mask there (.png/.jpg).
    Raises MediaFileError for a file that is not a photo or an output that cannot be written, and the SDK's
    other errors for the call itself; nothing is left at `output` unless it succeeded.
    """
    job = _ImageJob(source, output, mask)
    try:
        image = job.pixels(client.frame_limits() if faces is not None else None, faces)
        swap = functools.partial(client.swap, model=model, target=target, color="rgb", jpeg_quality=quality,
                                 return_mask=mask is not None, faces=faces, keep_shape=keep_shape, timeout=timeout)
        try:
            result = swap(image, encoding=job.encoding if image is job.payload else "raw")
        except AnswerTooLargeError as exc:
            result = swap(job.retry_as_pixels(exc, image, faces), encoding="raw")
        return job.finish(result, faces is None, quality)
    except BaseException:
        job.abort()
        raise


async def swap_image_file_async(
    client: AsyncClient, source: PathLike, output: PathLike, model: str, target: str, *,
    faces: FacesArg = "largest", keep_shape: float | None = None, quality: int | None = None,
    mask: PathLike | None = None, timeout: float | None = None,
) -> FileReport:
    """swap_image_file for an AsyncClient; file work runs on a thread, off the event loop."""
    job = await asyncio.to_thread(_ImageJob, source, output, mask)
    try:
        limits = await client.frame_limits() if faces is not None else None
        image = await asyncio.to_thread(job.pixels, limits, faces)
        swap = functools.partial(client.swap, model=model, target=target, color="rgb", jpeg_quality=quality,
                                 return_mask=mask is not None, faces=faces, keep_shape=keep_shape, timeout=timeout)
        try:
            result = await swap(image, encoding=job.encoding if image is job.payload else "raw")
        except AnswerTooLargeError as exc:
            result = await swap(await asyncio.to_thread(job.retry_as_pixels, exc, image, faces), encoding="raw")
        return await asyncio.to_thread(job.finish, result, faces is None, quality)
    except BaseException:
        job.abort()
        raise


def swap_video_file(
    client: Client, source: PathLike, output: PathLike, model: str, target: str, *,
    faces: FacesArg = "largest", keep_shape: float | None = None, options: VideoOptions | None = None,
    max_in_flight: int = 8, progress: Callable[[int], None] | None = None, cancel: threading.Event | None = None,
) -> FileReport:
    """Swaps the faces in every frame of a video file over one stream and writes the result.

    The output (.mp4, .m4v, .mov or .mkv) is H.264 yuv420p by default (see VideoOptions), with the input's frame
    timestamps (variable frame rates included) and every audio stream copied unchanged; a rotated input (phone
    video) is turned upright. faces / keep_shape: as swap_image_file. progress(n) is called as frames are written;
    setting `cancel` stops the work with CancelledError. Nothing is left at `output` unless it succeeded.
    """
    with VideoJob(source, output, options or VideoOptions(), progress=progress, cancel=cancel) as job:
        return job.run(client, model, target, faces=faces, keep_shape=keep_shape, max_in_flight=max_in_flight)


async def swap_video_file_async(
    client: AsyncClient, source: PathLike, output: PathLike, model: str, target: str, *,
    faces: FacesArg = "largest", keep_shape: float | None = None, options: VideoOptions | None = None,
    max_in_flight: int = 8, progress: Callable[[int], None] | None = None, cancel: threading.Event | None = None,
) -> FileReport:
    """swap_video_file for an AsyncClient: decoding and encoding run on threads, off the event loop."""
    job = await asyncio.to_thread(VideoJob, source, output, options or VideoOptions(), progress=progress,
                                  cancel=cancel)
    return await job.run_async(client, model, target, faces=faces, keep_shape=keep_shape, max_in_flight=max_in_flight)

"""The swap itself, as plain domain objects: decode -> fit to the model -> batch -> fit back -> encode.

Full frames (kind "full_frame") take a longer road through fullframe.py: decode -> find the faces (detect, or follow
them in a stream) -> decide which to swap to whom (mapping.py) -> align -> batch -> colour-match and paste back ->
encode.

No gRPC here: the servicer turns protobuf into a SwapJob and a SwapOutcome back into protobuf.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Hashable

import numpy as np

from . import imaging
from .detectors import FaceDetectorPool, single_threaded_blas
from .errors import AnswerTooLargeError, DeadlineExceededError, InvalidInputError, ResourceExhaustedError, SwapError
from .fullframe import FrameFace, FrameRequest, FullFrameSwapper
from .limits import MIB, Claim, FrameMemory
from .mapping import DescriptorCache, Mapping, Photo, largest_face
from .provenance import Provenance, mark_synthetic
from .registry import ModelRegistry
from .tracking import FrameTicket, StreamFaceState, TrackingConfig

# Encoded images bigger than this are decoded, and answers encoded, on a worker thread so the event loop keeps
# serving others; the count comes from the image's header, since a 2 KB PNG can hold 4096x4096 pixels.
_INLINE_PIXELS = 256 * 256
# Room in a response for everything but the image bytes (faces, timings, provenance): an answer whose images leave
# less than this under the message limit is refused rather than failing in gRPC after the work.
_RESPONSE_HEADROOM = 64 * 1024


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
    faces: str = "largest"  # full frames: "all" | "largest" | "index" (see mapping.Mapping.selection)
    face_index: int = 0  # full frames with faces="index": the face to swap, 0 = largest
    mapping: Mapping | None = None  # full frames: which faces to swap to whom, instead of faces / face_index
    keep_shape: float | None = None  # full frames: 0..1, see blending.finish_face; None = the server's setting
    return_region: bool = False  # full frames: answer with the changed region only (SwapOutcome.region)
    header: tuple[int, int] | None = None  # (height, width) of `encoded` from its header, read once (claim_memory)


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
    detect_ms: float = 0.0  # full frames: face detection + landmarks
    align_ms: float = 0.0  # full frames: cropping the aligned faces
    blend_ms: float = 0.0  # full frames: colour matching + paste-back (and covering lost faces)
    track_ms: float = 0.0  # stream full frames: following faces from the previous frame
    embed_ms: float = 0.0  # full frames: face descriptors for reference rules


@dataclasses.dataclass(frozen=True)
class SwapOutcome:
    image: OutputImage | None  # None only for a region answer of a frame that nothing changed
    mask: OutputImage | None
    timings: Timings
    frame_id: int
    provenance: Provenance  # the bundle and weights that made the image
    faces: tuple[FrameFace, ...] = ()  # full frames: faces found largest first, then lost ones (streams)
    region: tuple[int, int, int, int] | None = None  # return_region: (x0, y0, x1, y1) of image in the frame


class SwapEngine:
    def __init__(self, registry: ModelRegistry, tracking: TrackingConfig | None = None) -> None:
        """Image limits, face detection, tracking defaults, face mapping limits and the face-shape bend follow the
        registry's ServerConfig. tracking: overrides the config's tracking of full frames in streams."""
        config = registry.config
        single_threaded_blas()
        self.registry = registry
        self.image_limits = imaging.ImageLimits(config.max_image_side, config.max_image_pixels)
        self.frame_memory = FrameMemory(config.frame_memory_mb * MIB)
        self.max_image_bytes = config.max_message_mb * 1024 * 1024 - _RESPONSE_HEADROOM  # in one answer
        self.reference_limits = imaging.ImageLimits(config.max_reference_side, config.max_image_pixels)
        self.tracking = tracking or TrackingConfig(detect_every=config.detect_every, lost_faces=config.lost_faces,
                                                   lost_face_frames=config.lost_face_frames,
                                                   max_faces=config.max_faces_detected)
        detectors = FaceDetectorPool(config.detect_threads, config.detect_max_side, backend=config.detector,
                                     landmarks=config.landmarks, runtime=config.detect_runtime,
                                     max_faces=config.max_faces_detected)
        self.fullframe = FullFrameSwapper(detectors, keep_shape=config.keep_shape,
                                          max_faces=config.max_faces_per_frame, paste_mask=config.paste_mask)
        self.descriptors = DescriptorCache()

    async def new_stream_state(self, lost_faces: str | None = None, lost_face_frames: int | None = None,
                               mapping: Mapping | None = None, model: str = "",
                               wait_s: float | None = None) -> StreamFaceState:
        """Per-stream face tracks: pass the same object to every swap() of one stream, in frame order.
        lost_faces / lost_face_frames: the stream's lost-face policy (None = the server's). mapping: the stream's
        face mapping, its reference photos described here, once (the stream's frames then leave theirs unset), and
        the targets its rules name checked against `model` (the first frame's), which refuses the stream rather than
        failing every frame."""
        try:
            state = StreamFaceState(self.tracking, lost_faces, lost_face_frames)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
        if mapping is not None:
            for target in dict.fromkeys(rule.target for rule in mapping.rules if rule.target):
                await self.registry.get(model, target, timeout=wait_s)
            claim = self.frame_memory.claim(self._photos_bytes([p for rule in mapping.rules for p in rule.photos]))
            try:
                await claim.wait(wait_s)
                state.mapping = await self.describe(mapping)
            finally:
                claim.release()
        return state

    async def describe(self, mapping: Mapping) -> Mapping:
        """The mapping with its reference photos described (limits checked first; photos seen before come from the
        cache)."""
        config = self.registry.config
        mapping.check_limits(config.max_face_rules, config.max_reference_images)
        if mapping.threshold is None:
            mapping = dataclasses.replace(mapping, threshold=config.match_threshold)
        return await mapping.describe(self._photo_descriptor)

    async def _photo_descriptor(self, photo: Photo, where: str) -> np.ndarray:
        async def compute() -> np.ndarray:
            try:
                image = await asyncio.to_thread(self._decode_image, photo.encoded, photo.raw, self.reference_limits)
            except SwapError as exc:
                raise type(exc)(f"{where}: {exc}") from None
            pool = self.fullframe.detectors
            return await pool.embed(image, largest_face(await pool.detect(image), where))
        return await self.descriptors.get(photo, compute)

    def close(self) -> None:
        """Stops the face-detection threads (after the server stopped taking calls)."""
        self.fullframe.detectors.close()

    def claim_memory(self, job: SwapJob, stream: StreamFaceState | None = None) -> tuple[SwapJob, Claim]:
        """The job's place in the frame memory (limits.FrameMemory): its images' decoded bytes, known before decoding.
        Claims are granted in the order they are made. Returns the job with its encoded image's header read (the
        image is then not probed again) and the claim."""
        if job.raw is None and job.encoded is not None and job.header is None:
            job = dataclasses.replace(job, header=self._header(job.encoded, self.image_limits))
        return job, self.frame_memory.claim(self._decoded_bytes(job, stream))

    async def swap(self, job: SwapJob, caller: Hashable, wait_s: float | None = None,
                   stream: StreamFaceState | None = None, claim: Claim | None = None) -> SwapOutcome:
        """stream: the caller's stream state when the job is a frame of a SwapStream (full frames are then
        tracked over time); swap() must then be called in frame order. claim: the job's frame memory, granted
        (claim_memory), released here; None: the job claims it first and waits for it, at most wait_s."""
        start = time.perf_counter()
        ticket = stream.ticket() if stream is not None else None  # before any await: tickets follow call order
        try:
            if wait_s is not None and wait_s <= 0:  # the caller has given up: no work on its behalf
                raise DeadlineExceededError(f"the call's deadline passed {-wait_s * 1000:.1f} ms before the "
                                            "server took it up")
            if claim is None:
                job, claim = self.claim_memory(job, stream)  # before any await too: claims follow call order
            await claim.wait(wait_s)
            if job.kind == "full_frame":
                return await self._swap_full_frame(job, caller, wait_s, stream, ticket, start)
            if job.mapping is not None:
                raise InvalidInputError("mapping applies to full frames (kind = IMAGE_KIND_FULL_FRAME) only: an "
                                        "aligned face is one face; unset it")
            if ticket is not None:
                ticket.release()  # now: aligned faces have no faces to track, later frames need not wait
            return await self._swap_aligned(job, caller, wait_s, stream is None, start)
        finally:
            if claim is not None:
                claim.release()
            if ticket is not None:
                ticket.release()

    async def _swap_aligned(self, job: SwapJob, caller: Hashable, wait_s: float | None, bounded: bool,
                            start: float) -> SwapOutcome:
        self._check_output(job)
        model, target = await self.registry.get(job.model, job.target, timeout=wait_s)
        origin = Provenance(job.model, job.target, model.manifest_sha256)
        with model.lease():  # no await since get(): a reload frees a model only after the calls holding it
            if bounded:
                target.batcher.check_room()
            decoded = await self._read_image(job, square=True)
            height, width = decoded.shape[:2]
            size = target.manifest.resolution
            face = imaging.resize(decoded, size, size)
            decoded_at = time.perf_counter()
            (swapped, mask), info = await target.batcher.submit(face, caller, bounded)

        encoded_at = time.perf_counter()
        image, mask_out = await self._off_loop(height * width, self._encode, job, swapped, mask, height, width, origin)
        done = time.perf_counter()
        timings = Timings(
            decode_ms=(decoded_at - start) * 1e3,
            queue_ms=info.queue_s * 1e3,
            inference_ms=info.inference_s * 1e3,
            encode_ms=(done - encoded_at) * 1e3,
            total_ms=(done - start) * 1e3,
            batch_size=info.size,
        )
        return SwapOutcome(image, mask_out, timings, job.frame_id, origin)

    async def _swap_full_frame(self, job: SwapJob, caller: Hashable, wait_s: float | None,
                               stream: StreamFaceState | None, ticket: FrameTicket | None,
                               start: float) -> SwapOutcome:
        self._check_output(job)
        if stream is not None and stream.mapping is not None:
            mapping = stream.mapping
        else:
            mapping = job.mapping or Mapping.selection(job.faces, job.face_index)
        model, _ = await self.registry.get(job.model, job.target, timeout=wait_s)
        targets = {name: model.target(name) for name in mapping.targets(job.target)}  # NOT_FOUND before any work
        origin = Provenance(job.model, job.target, model.manifest_sha256)
        with model.lease():  # no await since get(): a reload frees a model only after the calls holding it
            if stream is None:  # a full queue refuses a call now, not after its frame was decoded and searched
                for target in targets.values():
                    target.batcher.check_room()
            frame = await self._read_image(job)  # its limits before the reference photos' work
            decoded_at = time.perf_counter()
            if mapping is job.mapping:  # the reference photos: their time is in total_ms
                mapping = await self.describe(mapping)
            request = FrameRequest(targets, job.target, mapping, caller, bounded=stream is None,
                                   want_mask=job.return_mask, keep_shape=job.keep_shape)
            result = await self.fullframe.swap(frame, request, stream, ticket)
        blended_at = time.perf_counter()
        image, mask, region = result.image, result.mask, None
        if job.return_region:  # the changed box only: the caller holds the rest of the frame
            region = result.region
            if region is not None:
                x0, y0, x1, y1 = region
                image = image[y0:y1, x0:x1]
                mask = None if mask is None else mask[y0:y1, x0:x1]
        image_out = mask_out = None
        if region is not None or not job.return_region:
            height, width = image.shape[:2]
            image_out, mask_out = await self._off_loop(height * width, self._encode, job, image, mask, height, width,
                                                       origin)
        done = time.perf_counter()
        timings = Timings(
            decode_ms=(decoded_at - start) * 1e3,
            queue_ms=result.batch.queue_s * 1e3,
            inference_ms=result.batch.inference_s * 1e3,
            encode_ms=(done - blended_at) * 1e3,
            total_ms=(done - start) * 1e3,
            batch_size=result.batch.size,
            detect_ms=result.detect_s * 1e3,
            align_ms=result.align_s * 1e3,
            blend_ms=result.blend_s * 1e3,
            track_ms=result.track_s * 1e3,
            embed_ms=result.embed_s * 1e3,
        )
        return SwapOutcome(image_out, mask_out, timings, job.frame_id, origin, result.faces, region)

    @staticmethod
    def _check_output(job: SwapJob) -> None:
        if not 1 <= job.jpeg_quality <= 100:
            raise InvalidInputError(f"jpeg_quality {job.jpeg_quality} must be in 1..100")

    def _check_shape(self, job: SwapJob, height: int, width: int, square: bool) -> None:
        if square and height != width:  # a stretched photo would come back as one face and no background
            raise InvalidInputError(f"the image is {width}x{height}, but an aligned face is a square crop (as "
                                    "facetwin-train extract makes them): for a photo or a video frame, send kind = "
                                    "IMAGE_KIND_FULL_FRAME (the Python SDK: faces='largest')")
        self._check_answer_size(job, height, width)

    def _check_answer_size(self, job: SwapJob, height: int, width: int) -> None:
        """Raw answers have a known size: one over the message limit is refused before the work. (A region answer's
        size is known only after it, and _encode checks it then.)"""
        if self._output_encoding(job) != "raw" or job.return_region:
            return
        size = height * width * (4 if job.return_mask else 3)
        if size > self.max_image_bytes:
            raise ResourceExhaustedError(
                f"the raw answer for this {width}x{height} image would be {size} bytes, over the server's message "
                f"limit ({self.max_image_bytes + _RESPONSE_HEADROOM} bytes): ask for PNG or JPEG output "
                "(output_encoding) or send a smaller image")

    @staticmethod
    def _output_encoding(job: SwapJob) -> str:
        if job.output_encoding == "same":
            return "raw" if job.raw is not None else "png"
        return job.output_encoding

    @staticmethod
    async def _off_loop(pixels: int, fn, *args):
        """fn(*args), on a worker thread when it works on more than _INLINE_PIXELS pixels."""
        if pixels > _INLINE_PIXELS:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def _decoded_bytes(self, job: SwapJob, stream: StreamFaceState | None) -> int:
        """What the job claims of the frame memory: its image decoded, and the largest of its mapping's reference
        photos (decoded one at a time while the frame is held: one claim per call, as a second claim made while
        holding the first could wait on calls that wait the same way). A stream's photos were described when it
        opened (new_stream_state)."""
        photos = []
        if job.mapping is not None and stream is None:
            photos = [photo for rule in job.mapping.rules for photo in rule.photos]
        return self._image_bytes(job.raw, job.header, self.image_limits) + self._photos_bytes(photos)

    def _photos_bytes(self, photos: list[Photo]) -> int:
        return max((self._image_bytes(p.raw, self._header(p.encoded, self.reference_limits) if p.encoded else None,
                                      self.reference_limits) for p in photos), default=0)

    @staticmethod
    def _image_bytes(raw: RawPixels | None, header: tuple[int, int] | None, limits: imaging.ImageLimits) -> int:
        """An image decoded (RGB uint8), in bytes, from its raw fields or its header's (height, width). 0 for an
        image that cannot be read or is over the limits, which decoding it then refuses with the reason."""
        if raw is not None:
            size = len(raw.data)
            return size if size <= 3 * min(limits.max_pixels, limits.max_side ** 2) else 0
        return 3 * header[0] * header[1] if header else 0

    @staticmethod
    def _header(encoded: bytes, limits: imaging.ImageLimits) -> tuple[int, int] | None:
        """(height, width) of JPEG/PNG bytes within the limits, from the header; None where probe_encoded refuses
        them (reading the image raises why, in its place)."""
        try:
            _, height, width = imaging.probe_encoded(encoded, limits)
        except SwapError:
            return None
        return height, width

    async def _read_image(self, job: SwapJob, square: bool = False) -> np.ndarray:
        """The request's image, RGB uint8. Its size comes first from the raw fields or the file's header: the
        limits, a raw answer's size and (square=True, an aligned face) its shape are checked before any pixel is
        decoded. Raw pixels are only viewed in place (no copy: never worth a thread); a large encoded image is
        decoded on a worker thread."""
        if job.raw is not None:
            image = self._decode_image(None, job.raw, self.image_limits)
            self._check_shape(job, *image.shape[:2], square)
            return image
        if job.encoded is None:
            raise InvalidInputError("request has no image: set image.encoded (JPEG/PNG bytes) or image.raw")
        height, width = job.header or imaging.probe_encoded(job.encoded, self.image_limits)[1:]
        self._check_shape(job, height, width, square)
        return await self._off_loop(height * width, imaging.decode_probed, job.encoded)

    @staticmethod
    def _decode_image(encoded: bytes | None, raw: RawPixels | None, limits: imaging.ImageLimits) -> np.ndarray:
        if raw is not None:
            return imaging.decode_raw(raw.data, raw.height, raw.width, raw.channels, raw.color, raw.dtype, limits)
        if encoded is not None:
            return imaging.decode_encoded(encoded, limits)
        raise InvalidInputError("request has no image: set image.encoded (JPEG/PNG bytes) or image.raw")

    def _encode(
        self, job: SwapJob, swapped: np.ndarray, mask: np.ndarray, height: int, width: int,
        origin: Provenance,
    ) -> tuple[OutputImage, OutputImage | None]:
        encoding = self._output_encoding(job)
        color = job.output_color or (job.raw.color if job.raw is not None else "rgb")
        swapped = imaging.resize(swapped, height, width)
        encoded = imaging.encode(swapped, encoding, color, job.jpeg_quality)
        image = OutputImage(mark_synthetic(encoded, encoding, origin.manifest_sha256), encoding, height, width, 3, color)
        mask_out = None
        if job.return_mask:
            mask = imaging.resize(mask, height, width)
            mask_encoding = "png" if encoding == "jpeg" else encoding  # masks stay lossless
            mask_out = OutputImage(imaging.encode(mask, mask_encoding), mask_encoding, height, width, 1, color)
        size = len(image.data) + (len(mask_out.data) if mask_out is not None else 0)
        if size > self.max_image_bytes:  # an encoded size is known only now
            raise AnswerTooLargeError(
                f"the {encoding} answer is {size} bytes, over the server's message limit "
                f"({self.max_image_bytes + _RESPONSE_HEADROOM} bytes): ask for JPEG output, a lower jpeg_quality, "
                "send a smaller image, or send its pixels with return_region", size)
        return image, mask_out

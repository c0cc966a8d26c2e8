"""facetwin.v1.FaceSwap: translates protobuf <-> domain objects and domain errors <-> gRPC status codes."""

from __future__ import annotations

import asyncio
import itertools
import logging

import grpc

from facetwin.v1 import facetwin_pb2 as pb
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc

from . import metrics
from .batcher import InferenceFailedError
from .engine import OutputImage, RawPixels, SwapEngine, SwapJob, SwapOutcome
from .errors import InvalidInputError, SwapError
from .registry import FAILED, READY, ModelRegistry

log = logging.getLogger(__name__)

_COLOR = {pb.COLOR_ORDER_UNSPECIFIED: "rgb", pb.COLOR_ORDER_RGB: "rgb", pb.COLOR_ORDER_BGR: "bgr"}
_COLOR_OUT = {"rgb": pb.COLOR_ORDER_RGB, "bgr": pb.COLOR_ORDER_BGR}
_DTYPE = {pb.PIXEL_TYPE_UNSPECIFIED: "uint8", pb.PIXEL_TYPE_UINT8: "uint8", pb.PIXEL_TYPE_FLOAT32: "float32"}
_ENCODING = {pb.ENCODING_UNSPECIFIED: "same", pb.ENCODING_RAW: "raw", pb.ENCODING_PNG: "png", pb.ENCODING_JPEG: "jpeg"}
_KIND = {pb.IMAGE_KIND_UNSPECIFIED: "aligned_face", pb.IMAGE_KIND_ALIGNED_FACE: "aligned_face",
         pb.IMAGE_KIND_FULL_FRAME: "full_frame"}
_STATUS = {"loading": pb.MODEL_STATUS_LOADING, READY: pb.MODEL_STATUS_READY, FAILED: pb.MODEL_STATUS_FAILED}


def _enum(table: dict, value: int, field: str):
    try:
        return table[value]
    except KeyError:
        raise InvalidInputError(f"{field} has unknown value {value}") from None


def job_from_proto(request: pb.SwapRequest) -> SwapJob:
    """SwapRequest -> SwapJob; rejects malformed fields with InvalidInputError."""
    if not request.model:
        raise InvalidInputError("model is empty: name a bundle from ListModels")
    if not request.target:
        raise InvalidInputError("target is empty: name one of the model's identities (ListModels)")
    which = request.image.WhichOneof("data")
    raw = None
    if which == "raw":
        r = request.image.raw
        raw = RawPixels(r.pixels, r.height, r.width, r.channels, _enum(_COLOR, r.color_order, "image.raw.color_order"),
                        _enum(_DTYPE, r.pixel_type, "image.raw.pixel_type"))
    elif which is None:
        raise InvalidInputError("image is empty: set image.encoded (JPEG/PNG bytes) or image.raw")
    out_color = None
    if request.output_color_order != pb.COLOR_ORDER_UNSPECIFIED:
        out_color = _enum(_COLOR, request.output_color_order, "output_color_order")
    return SwapJob(
        model=request.model,
        target=request.target,
        encoded=request.image.encoded if which == "encoded" else None,
        raw=raw,
        kind=_enum(_KIND, request.kind, "kind"),
        output_encoding=_enum(_ENCODING, request.output_encoding, "output_encoding"),
        output_color=out_color,
        jpeg_quality=request.jpeg_quality or 90,
        return_mask=request.return_mask,
        frame_id=request.frame_id,
    )


def _image_to_proto(image: OutputImage) -> pb.Image:
    if image.encoding == "raw":
        return pb.Image(raw=pb.RawImage(pixels=image.data, height=image.height, width=image.width,
                                        channels=image.channels, color_order=_COLOR_OUT[image.color],
                                        pixel_type=pb.PIXEL_TYPE_UINT8))
    return pb.Image(encoded=image.data)


def response_to_proto(outcome: SwapOutcome) -> pb.SwapResponse:
    t = outcome.timings
    return pb.SwapResponse(
        image=_image_to_proto(outcome.image),
        mask=_image_to_proto(outcome.mask) if outcome.mask is not None else None,
        timings=pb.StageTimings(decode_ms=t.decode_ms, queue_ms=t.queue_ms, inference_ms=t.inference_ms,
                                encode_ms=t.encode_ms, total_ms=t.total_ms, batch_size=t.batch_size),
        frame_id=outcome.frame_id,
    )


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    if isinstance(exc, SwapError):
        code, message = exc.code, str(exc)
    else:  # a bug: report it as INTERNAL with its type, keep serving
        log.exception("%s failed", method)
        code, message = grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see server logs"
    if isinstance(exc, InferenceFailedError):
        code = grpc.StatusCode.INTERNAL
    metrics.ERRORS.labels(method=method, code=code.name).inc()
    await context.abort(code, message)


class FaceSwapServicer(pb_grpc.FaceSwapServicer):
    def __init__(self, registry: ModelRegistry, engine: SwapEngine, stream_window: int = 16) -> None:
        self.registry = registry
        self.engine = engine
        self.stream_window = stream_window
        self._stream_ids = itertools.count()

    async def Swap(self, request: pb.SwapRequest, context: grpc.aio.ServicerContext) -> pb.SwapResponse:
        try:
            job = job_from_proto(request)
            outcome = await self.engine.swap(job, caller=context.peer(), wait_s=context.time_remaining())
        except Exception as exc:
            await _abort(context, "Swap", exc)
        metrics.observe(outcome, "Swap")
        return response_to_proto(outcome)

    async def SwapStream(self, request_iterator, context: grpc.aio.ServicerContext):
        """Frames are swapped concurrently (up to stream_window in flight) and answered strictly in order."""
        caller = ("stream", next(self._stream_ids))
        in_flight: asyncio.Queue = asyncio.Queue(maxsize=self.stream_window)
        done = object()

        async def read_frames() -> None:
            count = 0
            async for message in request_iterator:
                try:
                    job = job_from_proto(message.request)
                    task = asyncio.ensure_future(self.engine.swap(job, caller, wait_s=context.time_remaining()))
                except Exception as exc:  # report in order, after the frames before it
                    task = asyncio.get_running_loop().create_future()
                    task.set_exception(exc)
                await in_flight.put((message.request.frame_id, task))  # blocks when the window is full
                count += 1
            if count == 0:
                failed = asyncio.get_running_loop().create_future()
                failed.set_exception(InvalidInputError("the stream carried no frames: send at least one SwapStreamRequest"))
                await in_flight.put((0, failed))
            await in_flight.put(done)

        reader = asyncio.ensure_future(read_frames())
        try:
            while True:
                getter = asyncio.ensure_future(in_flight.get())
                await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():  # the reader died (client cancelled / transport error)
                    getter.cancel()
                    reader.result()
                    return
                entry = getter.result()
                if entry is done:
                    return
                frame_id, task = entry
                try:
                    outcome = await task
                except Exception as exc:
                    prefix = f"frame {frame_id}: "
                    if isinstance(exc, SwapError):
                        exc = type(exc)(prefix + str(exc))
                    await _abort(context, "SwapStream", exc)
                metrics.observe(outcome, "SwapStream")
                yield pb.SwapStreamResponse(status=pb.FRAME_STATUS_OK, response=response_to_proto(outcome))
        finally:
            reader.cancel()
            while not in_flight.empty():
                entry = in_flight.get_nowait()
                if entry is not done:
                    entry[1].cancel()

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        models = []
        for name, model in sorted(self.registry.models.items()):
            manifest = model.manifest
            models.append(pb.ModelInfo(
                name=name,
                identities=list(manifest.identities) if manifest else [],
                resolution=manifest.resolution if manifest else 0,
                backend=self.registry.backend_cls.name,
                status=_STATUS[model.status],
                variant=manifest.variant if manifest else "",
                manifest_sha256=model.manifest_sha256,
                error=model.error,
            ))
        return pb.ListModelsResponse(models=models)

"""facetwin.v1.FaceSwap: translates protobuf <-> domain objects and domain errors <-> gRPC status codes."""

from __future__ import annotations

import itertools
import logging

import grpc

from facetwin.v1 import facetwin_pb2 as pb
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc

from . import __version__, imaging, metrics
from .batcher import InferenceFailedError
from .config import ServerConfig
from .errors import InvalidInputError, SwapError
from .fullframe import DetectedFace
from .registry import FAILED, READY, ModelRegistry
from .streams import DROPPED, run_stream
from .swap import OutputImage, RawPixels, SwapEngine, SwapJob, SwapOutcome

log = logging.getLogger(__name__)

_COLOR = {pb.COLOR_ORDER_UNSPECIFIED: "rgb", pb.COLOR_ORDER_RGB: "rgb", pb.COLOR_ORDER_BGR: "bgr"}
_COLOR_OUT = {"rgb": pb.COLOR_ORDER_RGB, "bgr": pb.COLOR_ORDER_BGR}
_DTYPE = {pb.PIXEL_TYPE_UNSPECIFIED: "uint8", pb.PIXEL_TYPE_UINT8: "uint8", pb.PIXEL_TYPE_FLOAT32: "float32"}
_ENCODING = {pb.ENCODING_UNSPECIFIED: "same", pb.ENCODING_RAW: "raw", pb.ENCODING_PNG: "png", pb.ENCODING_JPEG: "jpeg"}
_KIND = {pb.IMAGE_KIND_UNSPECIFIED: "aligned_face", pb.IMAGE_KIND_ALIGNED_FACE: "aligned_face",
         pb.IMAGE_KIND_FULL_FRAME: "full_frame"}
_FACES = {pb.FACE_SELECTION_UNSPECIFIED: "largest", pb.FACE_SELECTION_ALL: "all",
          pb.FACE_SELECTION_LARGEST: "largest", pb.FACE_SELECTION_INDEX: "index"}
_POLICY = {pb.STREAM_POLICY_QUEUE: "queue", pb.STREAM_POLICY_LATEST: "latest"}
_POLICY_OUT = {name: value for value, name in _POLICY.items()}
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
    kind = _enum(_KIND, request.kind, "kind")
    faces = _enum(_FACES, request.faces, "faces")
    if request.face_index and faces != "index":
        raise InvalidInputError(f"face_index is {request.face_index} but faces is not FACE_SELECTION_INDEX: "
                                "set faces = FACE_SELECTION_INDEX to pick a face by number")
    keep_shape = None
    if request.HasField("keep_shape"):
        keep_shape = request.keep_shape
        if not 0.0 <= keep_shape <= 1.0:  # NaN fails too
            raise InvalidInputError(f"keep_shape is {keep_shape}: it must be in 0..1 (0 = the target's face shape, "
                                    "1 = the original face's), or unset for the server's default")
        if kind != "full_frame":
            raise InvalidInputError("keep_shape applies to full frames (kind = IMAGE_KIND_FULL_FRAME) only: an aligned "
                                    "face is returned as the model drew it; unset it")
    out_color = None
    if request.output_color_order != pb.COLOR_ORDER_UNSPECIFIED:
        out_color = _enum(_COLOR, request.output_color_order, "output_color_order")
    return SwapJob(
        model=request.model,
        target=request.target,
        encoded=request.image.encoded if which == "encoded" else None,
        raw=raw,
        kind=kind,
        output_encoding=_enum(_ENCODING, request.output_encoding, "output_encoding"),
        output_color=out_color,
        jpeg_quality=request.jpeg_quality or 90,
        return_mask=request.return_mask,
        frame_id=request.frame_id,
        faces=faces,
        face_index=request.face_index,
        keep_shape=keep_shape,
    )


def _image_to_proto(image: OutputImage) -> pb.Image:
    if image.encoding == "raw":
        return pb.Image(raw=pb.RawImage(pixels=image.data, height=image.height, width=image.width,
                                        channels=image.channels, color_order=_COLOR_OUT[image.color],
                                        pixel_type=pb.PIXEL_TYPE_UINT8))
    return pb.Image(encoded=image.data)


def _face_to_proto(detected: DetectedFace) -> pb.DetectedFace:
    face = detected.face
    x0, y0, x1, y1 = (int(v) for v in face.box)
    points = [] if face.landmarks is None else [pb.Point(x=float(x), y=float(y)) for x, y in face.landmarks]
    return pb.DetectedFace(box=pb.Box(x0=x0, y0=y0, x1=x1, y1=y1), landmarks=points, score=face.score,
                           swapped=detected.swapped)


def response_to_proto(outcome: SwapOutcome) -> pb.SwapResponse:
    t = outcome.timings
    return pb.SwapResponse(
        image=_image_to_proto(outcome.image),
        mask=_image_to_proto(outcome.mask) if outcome.mask is not None else None,
        timings=pb.StageTimings(decode_ms=t.decode_ms, queue_ms=t.queue_ms, inference_ms=t.inference_ms,
                                encode_ms=t.encode_ms, total_ms=t.total_ms, batch_size=t.batch_size,
                                detect_ms=t.detect_ms, align_ms=t.align_ms, blend_ms=t.blend_ms),
        frame_id=outcome.frame_id,
        faces=[_face_to_proto(face) for face in outcome.faces],
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
    def __init__(self, registry: ModelRegistry, engine: SwapEngine, config: ServerConfig) -> None:
        self.registry = registry
        self.engine = engine
        self.config = config
        self.stream_window = config.stream_window
        self.default_policy = config.stream_policy
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
        """Frames are swapped concurrently and answered strictly in order (see streams.run_stream)."""
        caller = ("stream", next(self._stream_ids))
        policy = [self.default_policy]
        faces_over_time = self.engine.new_stream_state()  # face tracks, so full-frame landmarks are smoothed

        async def frames():
            first = True
            async for message in request_iterator:
                if first and message.policy != pb.STREAM_POLICY_UNSPECIFIED:
                    policy[0] = _POLICY.get(message.policy, "invalid")
                first = False
                try:
                    yield message.request.frame_id, job_from_proto(message.request)
                except SwapError as exc:  # answered in order, after the frames before it
                    yield message.request.frame_id, exc

        def swap(job: SwapJob):  # run_stream starts frames in arrival order, as the stream state requires
            return self.engine.swap(job, caller, wait_s=context.time_remaining(), stream=faces_over_time)

        frames_iter = frames()
        try:
            first = await anext(frames_iter, None)
        except Exception as exc:
            await _abort(context, "SwapStream", exc)

        async def replay():
            if first is not None:
                yield first
            async for item in frames_iter:
                yield item

        try:
            async for frame_id, outcome in run_stream(replay(), swap, window=self.stream_window, policy=policy[0]):
                if outcome is DROPPED:
                    metrics.DROPPED.inc()
                    yield pb.SwapStreamResponse(status=pb.FRAME_STATUS_DROPPED, response=pb.SwapResponse(frame_id=frame_id))
                    continue
                metrics.observe(outcome, "SwapStream")
                yield pb.SwapStreamResponse(status=pb.FRAME_STATUS_OK, response=response_to_proto(outcome))
        except Exception as exc:
            await _abort(context, "SwapStream", exc)

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

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context) -> pb.GetServerInfoResponse:
        return server_info(self.config)


def server_info(config: ServerConfig) -> pb.GetServerInfoResponse:
    """The configuration a caller can act on: credentials wanted, and every limit with the status past it."""
    limits = pb.ServerLimits(
        max_message_bytes=config.max_message_mb * 1024 * 1024, max_image_side=config.max_image_side,
        max_image_pixels=config.max_image_pixels, image_formats=list(imaging.FORMATS),
        max_faces_per_frame=config.max_faces_per_frame, max_calls_per_client=config.max_calls_per_client,
        max_streams_per_client=config.max_streams_per_client, max_calls=config.max_calls,
        max_streams=config.max_streams, stream_window=config.stream_window,
        stream_idle_timeout_s=config.stream_idle_timeout_s, max_queue=config.max_queue)
    return pb.GetServerInfoResponse(
        version=__version__, auth_required=bool(config.auth_tokens_file), tls=bool(config.tls_cert),
        client_certificate_required=bool(config.tls_client_ca),
        default_stream_policy=_POLICY_OUT[config.stream_policy], limits=limits)

"""facetwin.v1.FaceSwap: translates protobuf <-> domain objects and domain errors <-> gRPC status codes."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools

import grpc

from facetwin.v1 import facetwin_pb2 as pb
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc

from . import __version__, imaging, logs, metrics
from .auth import CertificateScopes, authorize, client_id, named_client, visible_identities
from .batcher import InferenceFailedError
from .config import ServerConfig
from .errors import DeadlineExceededError, InvalidInputError, SwapError, shorten
from .fullframe import BLURRED, HELD, NOT_SWAPPED, PASSED, SWAPPED, FrameFace
from .limits import Admission, AdmissionLimits, Claim
from .mapping import Mapping, Photo, Rule, check_limits
from .provenance import DIGITAL_SOURCE_TYPE, Provenance
from .registry import FAILED, READY, ModelRegistry
from .streams import DROPPED, OK, FrameAnswer, StreamRun, next_message
from .swap import OutputImage, RawPixels, SwapEngine, SwapJob, SwapOutcome
from .tracking import DETECTED, LOST, TRACKED


class _Accepted(dict):
    """An enum's accepted numbers -> their domain names, with the enum, which names them in an error."""

    def __init__(self, enum, values: dict) -> None:
        super().__init__(values)
        self.enum = enum


_COLOR = _Accepted(pb.ColorOrder, {pb.COLOR_ORDER_UNSPECIFIED: "rgb", pb.COLOR_ORDER_RGB: "rgb",
                                   pb.COLOR_ORDER_BGR: "bgr"})
_COLOR_OUT = {"rgb": pb.COLOR_ORDER_RGB, "bgr": pb.COLOR_ORDER_BGR}
_DTYPE = _Accepted(pb.PixelType, {pb.PIXEL_TYPE_UNSPECIFIED: "uint8", pb.PIXEL_TYPE_UINT8: "uint8",
                                  pb.PIXEL_TYPE_FLOAT32: "float32"})
_ENCODING = _Accepted(pb.Encoding, {pb.ENCODING_UNSPECIFIED: "same", pb.ENCODING_RAW: "raw", pb.ENCODING_PNG: "png",
                                    pb.ENCODING_JPEG: "jpeg"})
_KIND = _Accepted(pb.ImageKind, {pb.IMAGE_KIND_UNSPECIFIED: "aligned_face", pb.IMAGE_KIND_ALIGNED_FACE: "aligned_face",
                                 pb.IMAGE_KIND_FULL_FRAME: "full_frame"})
_FACES = _Accepted(pb.FaceSelection, {pb.FACE_SELECTION_UNSPECIFIED: "largest", pb.FACE_SELECTION_ALL: "all",
                                      pb.FACE_SELECTION_LARGEST: "largest", pb.FACE_SELECTION_INDEX: "index"})
_POLICY = _Accepted(pb.StreamPolicy, {pb.STREAM_POLICY_QUEUE: "queue", pb.STREAM_POLICY_LATEST: "latest"})
_POLICY_OUT = {name: value for value, name in _POLICY.items()}
_STATUS = {"loading": pb.MODEL_STATUS_LOADING, READY: pb.MODEL_STATUS_READY, FAILED: pb.MODEL_STATUS_FAILED}
_LOST = _Accepted(pb.LostFacePolicy, {pb.LOST_FACE_POLICY_PASS: "pass", pb.LOST_FACE_POLICY_HOLD: "hold",
                                       pb.LOST_FACE_POLICY_BLUR: "blur"})
_LOST_OUT = {name: value for value, name in _LOST.items()}
_STATE_OUT = {DETECTED: pb.FACE_STATE_DETECTED, TRACKED: pb.FACE_STATE_TRACKED, LOST: pb.FACE_STATE_LOST}
_ACTION_OUT = {SWAPPED: pb.FACE_ACTION_SWAPPED, NOT_SWAPPED: pb.FACE_ACTION_NOT_SWAPPED, PASSED: pb.FACE_ACTION_PASSED,
               HELD: pb.FACE_ACTION_HELD, BLURRED: pb.FACE_ACTION_BLURRED}


def _enum(table: _Accepted, value: int, field: str):
    try:
        return table[value]
    except KeyError:
        names = ", ".join(table.enum.Name(number) for number in table if number)  # 0 is "unset": leave it out
        raise InvalidInputError(f"{field} has unknown value {value}: use one of {names}") from None


def job_from_proto(request: pb.SwapRequest, config: ServerConfig) -> SwapJob:
    """SwapRequest -> SwapJob; rejects malformed fields with InvalidInputError, a mapping past config's limits with
    ResourceExhaustedError."""
    if not request.model:
        raise InvalidInputError("model is empty: name a bundle from ListModels")
    if not request.target:
        raise InvalidInputError("target is empty: name one of the model's identities (ListModels)")
    encoded, raw = _image_from_proto(request.image, "image")
    kind = _enum(_KIND, request.kind, "kind")
    faces = _enum(_FACES, request.faces, "faces")
    if request.HasField("mapping") and (request.faces or request.face_index):
        raise InvalidInputError("faces / face_index and mapping both say which faces to swap: set one of them "
                                "(a FaceRule with selection does what faces does)")
    if request.face_index and faces != "index":
        raise InvalidInputError(f"face_index is {request.face_index} but faces is not FACE_SELECTION_INDEX: "
                                "set faces = FACE_SELECTION_INDEX to pick a face by number")
    mapping = mapping_from_proto(request.mapping, config) if request.HasField("mapping") else None
    keep_shape = None
    if request.HasField("keep_shape"):
        keep_shape = request.keep_shape
        if not 0.0 <= keep_shape <= 1.0:  # NaN fails too
            raise InvalidInputError(f"keep_shape is {keep_shape}: it must be in 0..1 (0 = the target's face shape, "
                                    "1 = the original face's), or unset for the server's default")
        if kind != "full_frame":
            raise InvalidInputError("keep_shape applies to full frames (kind = IMAGE_KIND_FULL_FRAME) only: an aligned "
                                    "face is returned as the model drew it; unset it")
    if (request.faces or request.face_index) and kind != "full_frame":
        raise InvalidInputError("faces / face_index choose among a full frame's faces (kind = IMAGE_KIND_FULL_FRAME): "
                                "an aligned face is one face; unset them")
    if request.return_region and kind != "full_frame":
        raise InvalidInputError("return_region applies to full frames (kind = IMAGE_KIND_FULL_FRAME) only: an aligned "
                                "face is answered whole; unset it")
    out_color = None
    if request.output_color_order != pb.COLOR_ORDER_UNSPECIFIED:
        out_color = _enum(_COLOR, request.output_color_order, "output_color_order")
    return SwapJob(
        model=request.model,
        target=request.target,
        encoded=encoded,
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
        mapping=mapping,
        return_region=request.return_region,
    )


def _image_from_proto(image: pb.Image, field: str) -> tuple[bytes | None, RawPixels | None]:
    """An Image's encoded bytes or raw pixels (not decoded yet)."""
    which = image.WhichOneof("data")
    if which == "encoded":
        return image.encoded, None
    if which == "raw":
        r = image.raw
        return None, RawPixels(r.pixels, r.height, r.width, r.channels,
                               _enum(_COLOR, r.color_order, f"{field}.raw.color_order"),
                               _enum(_DTYPE, r.pixel_type, f"{field}.raw.pixel_type"))
    raise InvalidInputError(f"{field} is empty: set {field}.encoded (JPEG/PNG bytes) or {field}.raw")


def mapping_from_proto(message: pb.FaceMapping, config: ServerConfig) -> Mapping:
    """FaceMapping -> mapping.Mapping (photos kept as sent; SwapEngine.describe reads them). The limits are checked
    on the message first: a mapping within the size of a message can hold millions of rules."""
    check_limits(len(message.rules), lambda: sum(len(rule.reference.images) for rule in message.rules),
                 config.max_face_rules, config.max_reference_images)
    rules = []
    for number, rule in enumerate(message.rules):
        field = f"mapping.rules[{number}]"
        which = rule.WhichOneof("pick")
        if which is None:
            raise InvalidInputError(f"{field} picks no faces: set its selection, track_id or reference")
        if rule.face_index and not (which == "selection" and rule.selection == pb.FACE_SELECTION_INDEX):
            raise InvalidInputError(f"{field}.face_index is {rule.face_index} but its selection is not "
                                    "FACE_SELECTION_INDEX: set selection = FACE_SELECTION_INDEX to pick a face by number")
        if which == "selection":
            rules.append(Rule(_enum(_FACES, rule.selection, f"{field}.selection"), rule.target,
                              index=rule.face_index))
        elif which == "track_id":
            rules.append(Rule("track", rule.target, track_id=rule.track_id))
        else:
            photos = tuple(Photo(*_image_from_proto(image, f"{field}.reference.images[{k}]"))
                           for k, image in enumerate(rule.reference.images))
            rules.append(Rule("reference", rule.target, photos=photos))
    threshold = message.match_threshold if message.HasField("match_threshold") else None
    return Mapping(tuple(rules), threshold)


@dataclasses.dataclass(frozen=True)
class MalformedMessage:
    """A request whose bytes are not a valid protobuf message (or hold invalid UTF-8 in a string field)."""

    kind: str  # the message type expected
    error: str  # the parser's complaint


def checked(request):
    """The request, or InvalidInputError when it arrived malformed."""
    if isinstance(request, MalformedMessage):
        raise InvalidInputError(f"the request is not a valid {request.kind} message ({shorten(request.error)}): "
                                "check the client's protobuf definitions against facetwin.v1")
    return request


def authorized(job: SwapJob) -> SwapJob:
    """The job, when the caller's token may use its model with every identity it renders (PermissionDeniedError
    otherwise), checked before any work."""
    authorize(job.model, job.mapping.targets(job.target) if job.mapping is not None else [job.target])
    return job


def stream_frame(message, number: int, config: ServerConfig) -> tuple[int, SwapJob | SwapError]:
    """One stream message as (frame_id, job), or (frame_id, the error to answer it with)."""
    if isinstance(message, MalformedMessage):
        return 0, InvalidInputError(f"stream message {number} is not a valid SwapStreamRequest "
                                    f"({shorten(message.error)}); frame id unknown")
    if not message.HasField("request"):  # a settings-only message, as some APIs open a stream with
        return 0, InvalidInputError(f"stream message {number} carries no frame (SwapStreamRequest.request is unset): "
                                    "every message carries one; put the stream's settings (policy, lost_faces, "
                                    "lost_face_frames, request.mapping) on its first frame's message")
    try:
        return message.request.frame_id, authorized(job_from_proto(message.request, config))
    except SwapError as exc:
        return message.request.frame_id, exc


def stream_answer_to_proto(answer: FrameAnswer, registry: ModelRegistry, named: tuple[str, str],
                           request_id: str, client: str) -> pb.SwapStreamResponse:
    """One frame's answer; `named` is the (model, target) the frame asked for, for its provenance and labels;
    `client` the caller's name (auth.named_client), for the usage metric."""
    labels = metrics.LabelBound(registry)(*named)
    if answer.status == OK:
        metrics.observe(answer.outcome, "SwapStream", client)
        metrics.STREAM_FRAMES.labels(*labels, "OK", "").inc()
        message = pb.SwapStreamResponse(status=pb.FRAME_STATUS_OK)
        fill_response(message.response, answer.outcome, request_id)
        return message
    response = pb.SwapResponse(frame_id=answer.frame_id, provenance=named_provenance(registry, *named),
                               request_id=request_id)
    if answer.status == DROPPED:
        metrics.STREAM_FRAMES.labels(*labels, "DROPPED", "").inc()
        return pb.SwapStreamResponse(status=pb.FRAME_STATUS_DROPPED, response=response)
    error = frame_error_to_proto(answer.error)
    metrics.STREAM_FRAMES.labels(*labels, "ERROR", error.code_name).inc()
    return pb.SwapStreamResponse(status=pb.FRAME_STATUS_ERROR, response=response, error=error)


def _safe_deserializer(message_class):
    """Parses request bytes; malformed bytes become a MalformedMessage for the servicer to answer as
    INVALID_ARGUMENT, instead of an UNKNOWN status and a traceback from inside gRPC."""
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception as exc:  # DecodeError, and UnicodeDecodeError from some protobuf runtimes
            return MalformedMessage(message_class.DESCRIPTOR.name, str(exc) or type(exc).__name__)
    return parse


def add_to_server(servicer: "FaceSwapServicer", server) -> None:
    """pb_grpc.add_FaceSwapServicer_to_server, with request parsing that never fails inside gRPC."""
    service = pb.DESCRIPTOR.services_by_name["FaceSwap"]
    factories = {(False, False): grpc.unary_unary_rpc_method_handler,
                 (True, True): grpc.stream_stream_rpc_method_handler}
    handlers = {}
    for method in service.methods:
        method_handler = getattr(servicer, method.name)
        if not method.client_streaming:
            method_handler = _checked_unary(method_handler)
        handlers[method.name] = factories[(method.client_streaming, method.server_streaming)](
            method_handler, request_deserializer=_safe_deserializer(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _checked_unary(method):
    async def handle(request, context):
        return await method(checked(request), context)
    return handle


def _fill_image(message: pb.Image, image: OutputImage) -> None:
    """Writes an image into a message in place: protobuf constructors copy nested messages, which for a raw 1080p
    frame is 6 MB per level of nesting."""
    if image.encoding == "raw":
        raw = message.raw
        raw.pixels, raw.height, raw.width, raw.channels = image.data, image.height, image.width, image.channels
        raw.color_order, raw.pixel_type = _COLOR_OUT[image.color], pb.PIXEL_TYPE_UINT8
    else:
        message.encoded = image.data


def _face_to_proto(found: FrameFace) -> pb.DetectedFace:
    face = found.face
    x0, y0, x1, y1 = (int(v) for v in face.box)
    # tolist: Python floats in one C call; iterating the array makes numpy scalars, three times slower per frame.
    points = [] if face.landmarks is None else [pb.Point(x=x, y=y) for x, y in face.landmarks.tolist()]
    return pb.DetectedFace(box=pb.Box(x0=x0, y0=y0, x1=x1, y1=y1), landmarks=points, score=face.score,
                           swapped=found.swapped, track_id=found.track_id, state=_STATE_OUT[found.state],
                           action=_ACTION_OUT[found.action], target=found.target or "",
                           reference_distance=found.distance, note=found.note)


def provenance_to_proto(origin: Provenance) -> pb.Provenance:
    return pb.Provenance(synthetic=True, digital_source_type=DIGITAL_SOURCE_TYPE, model=origin.model,
                         target=origin.target, manifest_sha256=origin.manifest_sha256)


def named_provenance(registry: ModelRegistry, model: str, target: str) -> pb.Provenance | None:
    """The provenance of a frame that was not swapped (dropped, failed), when it named a loaded model and target."""
    loaded = registry.models.get(model)
    if loaded is None or loaded.status != READY or target not in loaded.targets:
        return None
    return provenance_to_proto(Provenance(model, target, loaded.manifest_sha256))


def response_to_proto(outcome: SwapOutcome, request_id: str) -> pb.SwapResponse:
    response = pb.SwapResponse()
    fill_response(response, outcome, request_id)
    return response


def fill_response(response: pb.SwapResponse, outcome: SwapOutcome, request_id: str) -> None:
    """Writes a swap's outcome into a (nested) SwapResponse in place."""
    t = outcome.timings
    if outcome.image is not None:  # None: a region answer of a frame nothing changed (its region stays empty)
        _fill_image(response.image, outcome.image)
    if outcome.mask is not None:
        _fill_image(response.mask, outcome.mask)
    if outcome.region is not None:
        box = response.region
        box.x0, box.y0, box.x1, box.y1 = outcome.region
    response.timings.CopyFrom(pb.StageTimings(
        decode_ms=t.decode_ms, queue_ms=t.queue_ms, inference_ms=t.inference_ms, encode_ms=t.encode_ms,
        total_ms=t.total_ms, batch_size=t.batch_size, detect_ms=t.detect_ms, align_ms=t.align_ms,
        blend_ms=t.blend_ms, track_ms=t.track_ms, embed_ms=t.embed_ms))
    response.frame_id = outcome.frame_id
    response.faces.extend(_face_to_proto(face) for face in outcome.faces)
    response.provenance.CopyFrom(provenance_to_proto(outcome.provenance))
    response.request_id = request_id


def _error_code(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, SwapError) and not isinstance(exc, InferenceFailedError):
        return exc.code
    return grpc.StatusCode.INTERNAL


def frame_error_to_proto(error: SwapError) -> pb.FrameError:
    code = _error_code(error)
    return pb.FrameError(code=code.value[0], code_name=code.name, message=str(error))


class FaceSwapServicer(pb_grpc.FaceSwapServicer):
    def __init__(self, registry: ModelRegistry, engine: SwapEngine, config: ServerConfig,
                 certificate_scopes: CertificateScopes | None = None) -> None:
        self.registry = registry
        self.certificate_scopes = certificate_scopes
        self.engine = engine
        self.config = config
        self.admission = Admission(AdmissionLimits(config.max_calls_per_client, config.max_streams_per_client,
                                                   config.max_calls, config.max_streams))
        self.draining = asyncio.Event()  # set on SIGTERM: streams stop taking frames (server.FaceSwapServer.stop)
        self._stream_ids = itertools.count()

    # Errors propagate: interceptors.CallInterceptor answers a SwapError with its status code, counts and logs it.
    def _bind_scope(self, context: grpc.aio.ServicerContext) -> None:
        """What this call's client certificate may use, for auth.authorize (a token's scope is set before)."""
        if self.certificate_scopes is not None:
            self.certificate_scopes.bind(context)

    async def Swap(self, request: pb.SwapRequest, context: grpc.aio.ServicerContext) -> pb.SwapResponse:
        self._bind_scope(context)
        with self.admission.admit("call", client_id(context)):
            job = authorized(job_from_proto(request, self.config))
            outcome = await self.engine.swap(job, caller=context.peer(), wait_s=context.time_remaining())
        metrics.observe(outcome, "Swap", named_client(context))
        return response_to_proto(outcome, logs.current_request_id())

    async def SwapStream(self, request_iterator, context: grpc.aio.ServicerContext):
        """Frames are swapped concurrently and answered strictly in order, each with its own status
        (streams.StreamRun); the stream ends early only when idle, empty, or when the server drains."""
        self._bind_scope(context)
        with self.admission.admit("stream", client_id(context)):
            async for answer in self._run_stream(request_iterator, context):
                yield answer

    async def _run_stream(self, request_iterator, context: grpc.aio.ServicerContext):
        caller = ("stream", next(self._stream_ids))
        messages = aiter(request_iterator)
        first = await next_message(messages, self.config.stream_idle_timeout_s, self.draining)
        if first is None:  # no message: the caller sent none, or its call ended before the first arrived
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceededError("the call's deadline passed before the stream's first frame arrived")
            if context.cancelled():
                raise asyncio.CancelledError
        policy = self.config.stream_policy
        lost_faces, lost_face_frames, mapping = None, None, None
        if first is not None and not isinstance(first, MalformedMessage):
            if first.policy:
                policy = _enum(_POLICY, first.policy, "policy")
            if first.lost_faces:
                lost_faces = _enum(_LOST, first.lost_faces, "lost_faces")
            lost_face_frames = first.lost_face_frames or None
            if first.request.HasField("mapping"):  # the stream's, for every frame: its photos are described once
                mapping = mapping_from_proto(first.request.mapping, self.config)
                authorize(first.request.model, mapping.targets(first.request.target))
        # Face tracks, the lost-face policy and the mapping; a bad policy or mapping refuses the stream.
        faces_over_time = await self.engine.new_stream_state(
            lost_faces, lost_face_frames, mapping, model=first.request.model if mapping is not None else "",
            wait_s=context.time_remaining())

        # (model, target) of each frame taken: StreamRun answers every frame it takes, in arrival order.
        named: collections.deque[tuple[str, str]] = collections.deque()
        request_id, client = logs.current_request_id(), named_client(context)

        async def frames():
            number = 0
            message = first
            while message is not None:
                request = None if isinstance(message, MalformedMessage) else message.request
                named.append(("", "") if request is None else (request.model, request.target))
                if number and request is not None and request.HasField("mapping"):
                    yield request.frame_id, InvalidInputError(
                        "mapping is read from a stream's first message only, and holds for the whole stream: leave "
                        "it unset on later frames")
                elif number and request is not None and mapping is not None and (request.faces or request.face_index):
                    yield request.frame_id, InvalidInputError(
                        "this stream's faces are chosen by the mapping of its first message: leave faces / "
                        "face_index unset on its frames")
                else:
                    yield stream_frame(message, number, self.config)
                number += 1
                message = await anext(messages, None)

        def swap(job: SwapJob | tuple[SwapJob, Claim]):  # StreamRun starts frames in arrival order, as tracking needs
            job, claim = job if isinstance(job, tuple) else (job, None)
            return self.engine.swap(job, caller, wait_s=context.time_remaining(), stream=faces_over_time, claim=claim)

        async def admit(job: SwapJob):  # a frame starts once it has its frame memory (streams.py)
            job, claim = self.engine.claim_memory(job, faces_over_time)
            try:
                await claim.wait(context.time_remaining())
            except BaseException:
                claim.release()
                raise
            return (job, claim), claim.release

        run = StreamRun(frames(), swap, window=self.config.stream_window, policy=policy, stop=self.draining,
                        idle_timeout_s=self.config.stream_idle_timeout_s, admit=admit)
        async for answer in run.answers():
            yield stream_answer_to_proto(answer, self.registry, named.popleft(), request_id, client)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        self._bind_scope(context)
        models = []
        for name, model in sorted(self.registry.models.items()):
            manifest = model.manifest
            identities = visible_identities(name, manifest.identities if manifest else ())
            if identities is None:  # a model this caller's token may not use is not shown to it
                continue
            models.append(pb.ModelInfo(
                name=name,
                identities=identities,
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
        stream_idle_timeout_s=config.stream_idle_timeout_s, max_queue=config.max_queue,
        max_face_rules=config.max_face_rules, max_reference_images=config.max_reference_images,
        max_reference_side=config.max_reference_side, max_frame_memory_bytes=config.frame_memory_mb * 1024 * 1024,
        max_faces_detected=config.max_faces_detected)
    return pb.GetServerInfoResponse(
        version=__version__, auth_required=bool(config.auth_tokens_file), tls=bool(config.tls_cert),
        client_certificate_required=bool(config.tls_client_ca),
        default_stream_policy=_POLICY_OUT[config.stream_policy], limits=limits,
        default_lost_faces=_LOST_OUT[config.lost_faces], default_lost_face_frames=config.lost_face_frames,
        default_match_threshold=config.match_threshold, detect_every=config.detect_every,
        processes=config.processes, default_keep_shape=config.keep_shape)

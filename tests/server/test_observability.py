"""Request ids, metrics, log lines, tracing and every response's provenance, through the real server and CLI process."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from facetwin.server import imaging, logs
from facetwin.server.config import ServerConfig
from facetwin.server.errors import InvalidInputError
from facetwin.server.interceptors import CallInterceptor, request_id_from
from facetwin.server.provenance import DIGITAL_SOURCE_TYPE
from facetwin.v1 import facetwin_pb2 as pb
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc

from ..conftest import ServerThread
from .test_provenance import source_type, xmp_of

SERVER = Path(sys.executable).with_name("facetwin-server")


# ---- the real server ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def observed(tiny_model_dir):
    """A server with its metrics port open; a window of one frame makes "latest" streams drop frames."""
    metrics_port = _free_port()
    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(tiny_model_dir), metrics_port=metrics_port,
                                       stream_window=1, grace_s=1.0))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.FaceSwapStub(channel)
        info = stub.ListModels(pb.ListModelsRequest(), timeout=10).models[0]
        yield stub, info, metrics_port
    server.stop()


def face_request(info, target: str | None = None, size: int = 32, **kwargs) -> pb.SwapRequest:
    face = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return pb.SwapRequest(model=info.name, target=info.identities[1] if target is None else target,
                          image=pb.Image(raw=pb.RawImage(pixels=face.tobytes(), height=size, width=size, channels=3)),
                          **kwargs)


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def series(name: str, **labels: str) -> str:
    return name + "{" + ",".join(f'{key}="{value}"' for key, value in sorted(labels.items())) + "}"


def assert_provenance(response: pb.SwapResponse, info, target: str) -> None:
    p = response.provenance
    assert p.synthetic and p.digital_source_type == DIGITAL_SOURCE_TYPE
    assert (p.model, p.target, p.manifest_sha256) == (info.name, target, info.manifest_sha256)
    assert len(info.manifest_sha256) == 64


def test_request_id_is_the_callers_or_a_new_one(observed):
    stub, info, _ = observed
    reply, call = stub.Swap.with_call(face_request(info), metadata=[("x-request-id", "order-17/frame-3")], timeout=10)
    assert reply.request_id == "order-17/frame-3"
    assert ("x-request-id", "order-17/frame-3") in call.trailing_metadata()
    fresh = {stub.Swap(face_request(info), timeout=10).request_id for _ in range(2)}
    for unusable in ("x" * 129, ""):  # gRPC itself refuses to send values that are not printable ASCII
        fresh.add(stub.Swap(face_request(info), metadata=[("x-request-id", unusable)], timeout=10).request_id)
    assert len(fresh) == 4 and all(len(rid) == 32 and int(rid, 16) >= 0 for rid in fresh)
    with pytest.raises(grpc.RpcError) as error:  # a rejected call names its id too, for the caller to quote
        stub.Swap(face_request(info, target="nobody"), metadata=[("x-request-id", "bad-1")], timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert ("x-request-id", "bad-1") in error.value.trailing_metadata()


def test_request_ids_that_are_kept_and_replaced():
    assert request_id_from([("x-request-id", "x" * 128)]) == "x" * 128
    assert request_id_from([("other", "a"), ("x-request-id", "a b~")]) == "a b~"
    for unusable in ("x" * 129, "", "tab\there", "caf\u00e9", b"bytes"):
        assert len(request_id_from([("x-request-id", unusable)])) == 32
    assert request_id_from(None) != request_id_from(None)


def test_every_unary_response_carries_provenance_and_encoded_files_the_xmp(observed):
    stub, info, _ = observed
    target = info.identities[1]
    assert_provenance(stub.Swap(face_request(info), timeout=10), info, target)  # raw pixels: the field only
    face = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    png = imaging.encode(face, "png")
    for encoding in (pb.ENCODING_PNG, pb.ENCODING_JPEG):
        reply = stub.Swap(pb.SwapRequest(model=info.name, target=target, image=pb.Image(encoded=png),
                                         output_encoding=encoding, return_mask=True), timeout=10)
        assert_provenance(reply, info, target)
        data = reply.image.encoded
        assert source_type(xmp_of(data)) == (DIGITAL_SOURCE_TYPE, f"bundle manifest sha256 {info.manifest_sha256}")
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape == (32, 32, 3)


def test_stream_frames_carry_provenance_and_the_request_id_dropped_ones_too(observed):
    stub, info, _ = observed
    target = info.identities[0]
    big = np.ascontiguousarray(np.tile(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8),
                                       (24, 24, 1)))  # slow enough to decode and shrink that frames pile up
    requests = [pb.SwapStreamRequest(policy=pb.STREAM_POLICY_LATEST, request=pb.SwapRequest(
        model=info.name, target=target, frame_id=i, image=pb.Image(raw=pb.RawImage(
            pixels=big.tobytes(), height=big.shape[0], width=big.shape[1], channels=3)))) for i in range(30)]
    # keep_shape applies to full frames only: refused as the frame is read, so it is never dropped
    requests.append(pb.SwapStreamRequest(request=face_request(info, target, keep_shape=0.5, frame_id=30)))
    requests.append(pb.SwapStreamRequest(request=face_request(info, "nobody", frame_id=31)))  # names no target
    replies = list(stub.SwapStream(iter(requests), metadata=[("x-request-id", "stream-9")], timeout=120))
    statuses = {reply.status for reply in replies[:30]}
    assert statuses == {pb.FRAME_STATUS_OK, pb.FRAME_STATUS_DROPPED}, "a one-frame window must drop frames"
    assert [reply.status for reply in replies[30:]] == [pb.FRAME_STATUS_ERROR] * 2
    for reply in replies:
        assert reply.response.request_id == "stream-9"
    for reply in replies[:31]:
        assert_provenance(reply.response, info, target)
    assert not replies[31].response.HasField("provenance")  # no model made anything for a target it lacks


def test_metrics_count_every_status_with_bounded_labels(observed):
    stub, info, port = observed
    target = info.identities[1]
    before = scrape(port)
    for _ in range(3):
        stub.Swap(face_request(info), timeout=10)
    made_up = [f"made-up-{i}" for i in range(4)]
    for name in made_up:
        with pytest.raises(grpc.RpcError):
            stub.Swap(face_request(info, target=name), timeout=10)  # a loaded model, a made-up target
        with pytest.raises(grpc.RpcError):
            stub.Swap(pb.SwapRequest(model=name, target=target, image=face_request(info).image), timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.Swap(face_request(info, size=4), timeout=10)  # too small: INVALID_ARGUMENT
    stub.ListModels(pb.ListModelsRequest(), timeout=10)
    frames = [pb.SwapStreamRequest(request=face_request(info, frame_id=i)) for i in range(5)]
    frames.append(pb.SwapStreamRequest(request=face_request(info, size=4, frame_id=5)))  # a frame's own error
    frames.append(pb.SwapStreamRequest(request=face_request(info, target="made-up-frame", frame_id=6)))
    statuses = [reply.status for reply in stub.SwapStream(iter(frames), timeout=30)]
    assert statuses == [pb.FRAME_STATUS_OK] * 5 + [pb.FRAME_STATUS_ERROR] * 2
    after = scrape(port)

    def grew(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    ok = dict(method="Swap", model=info.name, target=target)
    assert grew(series("facetwin_requests_total", code="OK", **ok)) == 3
    assert grew(series("facetwin_requests_total", code="NOT_FOUND", method="Swap", model=info.name,
                       target="unknown")) == 4
    assert grew(series("facetwin_requests_total", code="NOT_FOUND", method="Swap", model="unknown",
                       target="unknown")) == 4
    assert grew(series("facetwin_requests_total", code="INVALID_ARGUMENT", **ok)) == 1
    assert grew(series("facetwin_requests_total", code="OK", method="ListModels", model="", target="")) == 1
    assert grew(series("facetwin_requests_total", code="OK", method="SwapStream", **{k: v for k, v in ok.items()
                                                                                     if k != "method"})) == 1
    assert grew(series("facetwin_request_duration_seconds_count", **ok)) == 4  # 3 OK + 1 INVALID_ARGUMENT
    assert grew(series("facetwin_stream_duration_seconds_count", method="SwapStream")) == 1
    assert grew(series("facetwin_swaps_total", **ok)) == 3
    stream = dict(method="SwapStream", model=info.name, target=target)
    assert grew(series("facetwin_swaps_total", **stream)) == 5
    frame = dict(model=info.name, target=target)
    assert grew(series("facetwin_stream_frames_total", status="OK", code="", **frame)) == 5
    assert grew(series("facetwin_stream_frames_total", status="ERROR", code="INVALID_ARGUMENT", **frame)) == 1
    assert grew(series("facetwin_stream_frames_total", status="ERROR", code="NOT_FOUND", model=info.name,
                       target="unknown")) == 1
    for histogram in ("facetwin_swap_seconds", "facetwin_queue_seconds", "facetwin_inference_seconds"):
        assert grew(series(histogram + "_count", **ok)) == 3
        assert grew(series(histogram + "_sum", **ok)) > 0
    assert grew(series("facetwin_batch_size_count", model=info.name, target=target)) == 8
    assert after[series("facetwin_calls_in_flight", method="Swap")] == 0
    assert after[series("facetwin_streams_open", method="SwapStream")] == 0
    assert "facetwin_queue_depth" in after  # the autoscaling signal stays
    assert not [key for key in after if "made-up" in key], "a caller's names became label values"


def test_open_streams_are_counted_while_open(observed):
    stub, info, port = observed
    release = threading.Event()

    def frames():
        yield pb.SwapStreamRequest(request=face_request(info))
        release.wait(30)  # keeps the stream open

    replies = stub.SwapStream(frames(), timeout=60)
    next(replies)  # the first answer: the stream is surely open
    gauge = series("facetwin_streams_open", method="SwapStream")
    try:
        assert scrape(port)[gauge] == 1
    finally:
        release.set()
    assert list(replies) == []
    deadline = time.monotonic() + 10
    while scrape(port)[gauge] != 0:
        assert time.monotonic() < deadline, "the stream's gauge never went back down"
        time.sleep(0.05)


def test_a_call_refused_for_credentials_is_counted_and_logged_once(tiny_model_dir, tmp_path, caplog):
    from prometheus_client import REGISTRY

    tokens = tmp_path / "tokens"
    tokens.write_text("ci:ci-token-1\n")
    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(tiny_model_dir),
                                       auth_tokens_file=str(tokens), grace_s=1.0))
    labels = dict(method="Swap", model="", target="", code="UNAUTHENTICATED")  # refused before the request is read
    before = REGISTRY.get_sample_value("facetwin_requests_total", labels) or 0.0
    caplog.set_level(logging.INFO, logger="facetwin")
    try:
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as error:
            pb_grpc.FaceSwapStub(channel).Swap(pb.SwapRequest(model="tiny"), metadata=[("x-request-id", "no-token")],
                                               timeout=10)
    finally:
        server.stop()
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ("x-request-id", "no-token") in error.value.trailing_metadata()
    assert REGISTRY.get_sample_value("facetwin_requests_total", labels) == before + 1
    # timed as the unary call it is, though the refusal's handler is a streaming one
    assert REGISTRY.get_sample_value("facetwin_stream_duration_seconds_count", {"method": "Swap"}) is None
    assert REGISTRY.get_sample_value("facetwin_streams_open", {"method": "Swap"}) is None
    lines = [r for r in caplog.records if "no-token" in (getattr(r, "request_id", ""), r.getMessage())]
    assert len(lines) == 1 and lines[0].code == "UNAUTHENTICATED" and "needs credentials" in lines[0].error
    assert lines[0].client == "127.0.0.1"  # no token: the client is its address


# ---- the interceptor on its own real gRPC server: the error paths a healthy servicer never takes ------------------

async def _serve_faulty_methods(calls):
    async def invalid(request, context):
        raise InvalidInputError("image.raw.height is 0: send the image's height")

    async def bug(request, context):
        return {}["missing key"]

    async def refused(request, context):  # what an authentication interceptor does
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "token 'ci' may not call this")

    handlers = {name: grpc.unary_unary_rpc_method_handler(fn, request_deserializer=pb.SwapRequest.FromString,
                                                          response_serializer=pb.SwapResponse.SerializeToString)
                for name, fn in (("Invalid", invalid), ("Bug", bug), ("Refused", refused))}
    server = grpc.aio.server(interceptors=[CallInterceptor(lambda model, target: ("unknown", "unknown"))])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Faulty", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    results = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for name in calls:
                method = channel.unary_unary(f"/test.Faulty/{name}", request_serializer=pb.SwapRequest.SerializeToString,
                                             response_deserializer=pb.SwapResponse.FromString)
                try:
                    await method(pb.SwapRequest(model="m"), metadata=[("x-request-id", f"id-{name}")], timeout=10)
                except grpc.aio.AioRpcError as exc:
                    results[name] = (exc.code(), exc.details())
    finally:
        await server.stop(0)
    return results


def test_errors_become_statuses_and_one_log_line_each(caplog):
    caplog.set_level(logging.INFO, logger="facetwin.server.calls")
    results = asyncio.run(_serve_faulty_methods(["Invalid", "Bug", "Refused"]))
    assert results["Invalid"] == (grpc.StatusCode.INVALID_ARGUMENT, "image.raw.height is 0: send the image's height")
    assert results["Refused"] == (grpc.StatusCode.PERMISSION_DENIED, "token 'ci' may not call this")
    code, details = results["Bug"]
    assert code == grpc.StatusCode.INTERNAL and details == ("internal error (KeyError); the server log has it under "
                                                            "request id id-Bug")
    lines = {record.request_id: record for record in caplog.records if record.name == "facetwin.server.calls"}
    assert set(lines) == {"id-Invalid", "id-Bug", "id-Refused"}  # one line per call
    for rid, code, level in (("id-Invalid", "INVALID_ARGUMENT", logging.INFO),
                             ("id-Refused", "PERMISSION_DENIED", logging.INFO), ("id-Bug", "INTERNAL", logging.ERROR)):
        record = lines[rid]
        assert (record.code, record.levelno, record.model, record.method) == (code, level, "unknown", rid[3:])
        assert record.peer.startswith("ipv4:127.0.0.1:") and record.duration_ms >= 0
        assert (record.exc_info is not None) == (code == "INTERNAL"), "a traceback for the server's bugs only"
    assert "missing key" in lines["id-Bug"].error  # the operator sees what the caller is not told


def test_log_lines_of_a_call_carry_its_request_id():
    text, structured = io.StringIO(), io.StringIO()
    logger = logging.getLogger("facetwin.test.lines")
    logger.propagate, logger.level = False, logging.INFO
    logger.handlers = [logs.handler("text", text), logs.handler("json", structured)]
    token = logs.bind_call(request_id="abc-1", method="Swap")
    try:
        logger.info("inside %s", "the call", extra={"faces": 2})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logs.unbind_call(token)
    logger.info("outside")
    lines = text.getvalue().splitlines()
    assert lines[0].endswith("INFO facetwin.test.lines [abc-1]: inside the call")
    assert lines[-1].endswith("INFO facetwin.test.lines: outside")
    inside, failed, outside = (json.loads(line) for line in structured.getvalue().splitlines())
    assert (inside["message"], inside["request_id"], inside["method"], inside["faces"]) == \
           ("inside the call", "abc-1", "Swap", 2)
    assert failed["request_id"] == "abc-1" and "RuntimeError: boom" in failed["exception"]
    assert "request_id" not in outside and outside["level"] == "INFO"
    with pytest.raises(ValueError, match=r"--log-format \(FACETWIN_LOG_FORMAT\) 'xml' must be one of text, json"):
        ServerConfig.from_env({"FACETWIN_LOG_FORMAT": "xml"})


def test_the_shared_batcher_does_not_keep_its_first_callers_request_id():
    from facetwin.server.batcher import DynamicBatcher, InferenceFailedError

    lines = io.StringIO()
    logger = logging.getLogger("facetwin.server.batcher")
    handler = logs.handler("json", lines)
    logger.addHandler(handler)

    def broken(items):
        raise RuntimeError("backend fell over")

    async def two_callers():
        batcher = DynamicBatcher(broken, max_batch=1, max_delay_s=0.0)
        try:
            for rid in ("first", "second"):
                token = logs.bind_call(request_id=rid, method="Swap")
                try:
                    with pytest.raises(InferenceFailedError):
                        await batcher.submit(1, caller=rid)
                finally:
                    logs.unbind_call(token)
        finally:
            await batcher.close()

    try:
        asyncio.run(two_callers())
    finally:
        logger.removeHandler(handler)
    failures = [json.loads(line) for line in lines.getvalue().splitlines()]
    assert len(failures) == 2 and all("backend fell over" in f["exception"] for f in failures)
    assert not [f for f in failures if "request_id" in f], "a batch serves many calls: it is no one call's line"


def test_traced_calls_carry_the_request_id_and_their_log_lines_the_trace(tiny_model_dir):
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorServer
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    instrumentor = GrpcAioInstrumentorServer()  # what `opentelemetry-instrument` applies
    instrumentor.instrument(tracer_provider=provider)
    try:
        server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(tiny_model_dir), grace_s=1.0))
    finally:
        instrumentor.uninstrument()  # servers made later in this process are not traced
    lines, logger = io.StringIO(), logging.getLogger("facetwin.server.calls")
    handler, level = logs.handler("json", lines), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.FaceSwapStub(channel)
            info = stub.ListModels(pb.ListModelsRequest(), timeout=10).models[0]
            stub.Swap(face_request(info), metadata=[("x-request-id", "traced-ok")], timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.Swap(face_request(info, target="nobody"), metadata=[("x-request-id", "traced-bad")], timeout=10)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        server.stop()
    by_id = {span.attributes.get("facetwin.request_id"): span for span in spans.get_finished_spans()}
    ok, bad = by_id["traced-ok"], by_id["traced-bad"]
    assert ok.name == "/facetwin.v1.FaceSwap/Swap" and ok.attributes["rpc.grpc.status_code"] == 0
    assert (ok.attributes["facetwin.model"], ok.attributes["facetwin.target"]) == (info.name, info.identities[1])
    assert bad.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert bad.attributes["facetwin.target"] == "unknown"
    line = json.loads(lines.getvalue().splitlines()[-1])
    assert (line["request_id"], line["trace_id"], line["span_id"]) == (
        "traced-bad", format(bad.context.trace_id, "032x"), format(bad.context.span_id, "016x"))


# ---- the real CLI process: JSON lines on stderr -------------------------------------------------------------------

def test_json_log_lines_of_the_real_process(tiny_model_dir):
    port = _free_port()
    proc = subprocess.Popen([str(SERVER), "serve", "--log-format", "json", "--log-level", "DEBUG", "--model-dir",
                             str(tiny_model_dir), "--address", f"127.0.0.1:{port}"],
                            env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.FaceSwapStub(channel)
            deadline = time.monotonic() + 60
            while True:  # until the model is warm
                try:
                    info = stub.ListModels(pb.ListModelsRequest(), timeout=1).models[0]
                    if info.status == pb.MODEL_STATUS_READY:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "the server never loaded its model"
                time.sleep(0.1)
            stub.Swap(face_request(info), metadata=[("x-request-id", "json-ok")], timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.Swap(face_request(info, target="nobody"), metadata=[("x-request-id", "json-bad")], timeout=10)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [json.loads(line) for line in stderr.splitlines()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    by_id = {line["request_id"]: line for line in lines if line["logger"] == "facetwin.server.calls"}
    bad = by_id["json-bad"]
    assert (bad["level"], bad["method"], bad["code"], bad["model"], bad["target"]) == \
           ("INFO", "Swap", "NOT_FOUND", info.name, "unknown")
    assert "has no target identity 'nobody'" in bad["error"] and "exception" not in bad
    assert bad["peer"].startswith("ipv4:127.0.0.1:") and bad["client"] == "127.0.0.1" and bad["duration_ms"] > 0
    assert (by_id["json-ok"]["level"], by_id["json-ok"]["code"]) == ("DEBUG", "OK")
    assert any(line["message"].startswith("config {") for line in lines)


def test_streams_past_their_deadline_are_counted_as_such(served_model):
    """A stream whose deadline passes before its first frame reaches the handler ends DEADLINE_EXCEEDED in the
    metrics too, not as a caller's empty stream (INVALID_ARGUMENT)."""
    from prometheus_client import REGISTRY

    def finished(code: str | None = None) -> float:
        return sum(sample.value for family in REGISTRY.collect() if family.name == "facetwin_requests"
                   for sample in family.samples if sample.name == "facetwin_requests_total"
                   and sample.labels["method"] == "SwapStream" and code in (None, sample.labels["code"]))

    face = served_model.sample_faces[served_model.identities[0]][0]
    side = served_model.resolution
    image = pb.Image(raw=pb.RawImage(pixels=face.tobytes(), height=side, width=side, channels=3))

    def requests():
        for frame_id in range(50):
            yield pb.SwapStreamRequest(request=pb.SwapRequest(model=served_model.model,
                                                              target=served_model.identities[1],
                                                              frame_id=frame_id, image=image))

    before, invalid_before = finished(), finished("INVALID_ARGUMENT")
    with grpc.insecure_channel(served_model.address) as channel:
        stub = pb_grpc.FaceSwapStub(channel)
        for timeout in np.linspace(0.0005, 0.005, 150):  # some end before the handler runs, some at its first read
            with pytest.raises(grpc.RpcError) as error:
                for _ in stub.SwapStream(requests(), timeout=float(timeout)):
                    pass
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    counted = None
    while counted != finished():  # the server may finish a call after its caller has seen the deadline
        counted = finished()
        time.sleep(0.5)
    assert counted > before
    assert finished("INVALID_ARGUMENT") == invalid_before


def test_calls_the_server_cuts_off_at_the_end_of_its_drain_are_logged_as_such(tiny_model_dir, caplog):
    """A health watch lasts until the server stops: the drain's grace runs out under it. That is the server ending
    the call (UNAVAILABLE), not the caller cancelling it."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(tiny_model_dir), grace_s=1.0))
    caplog.set_level(logging.INFO, logger="facetwin")
    with grpc.insecure_channel(server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                          metadata=[("x-request-id", "watcher")], timeout=30)
        next(watch)  # the watch is open
        server.call(server.server.stop(grace=0.5))
        with pytest.raises(grpc.RpcError):
            for _ in watch:
                pass
    server.loop.call_soon_threadsafe(server.loop.stop)
    lines = [r for r in caplog.records if getattr(r, "request_id", "") == "watcher" and hasattr(r, "code")]
    assert len(lines) == 1 and lines[0].code == "UNAVAILABLE" and "cut off" in lines[0].error, \
        [(r.code, r.error) for r in lines]

"""Start-up, broken bundles, the dry run, and graceful drain on SIGTERM of the real `facetwin-server` process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facetwin.server.config import ServerConfig
from facetwin.v1 import facetwin_pb2 as pb
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc

from ..conftest import ServerThread

SERVER = Path(sys.executable).with_name("facetwin-server")


def _face_request(model: str, target: str, size: int) -> pb.SwapRequest:
    face = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return pb.SwapRequest(model=model, target=target, image=pb.Image(raw=pb.RawImage(
        pixels=face.tobytes(), height=size, width=size, channels=3)))


def test_broken_bundle_fails_alone(tiny_model_dir, tmp_path, caplog):
    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir / "tiny", models / "good")
    shutil.copytree(tiny_model_dir / "tiny", models / "broken")
    onnx_file = next((models / "broken").glob("*.onnx"))
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10] + b"corruption")
    (models / "not-a-bundle").mkdir()
    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(models)))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.FaceSwapStub(channel)
            listing = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
            assert set(listing) == {"good", "broken"}
            assert listing["good"].status == pb.MODEL_STATUS_READY
            assert listing["broken"].status == pb.MODEL_STATUS_FAILED
            assert "corrupt" in listing["broken"].error and onnx_file.name in listing["broken"].error
            target = listing["good"].identities[1]
            with pytest.raises(grpc.RpcError) as info:
                stub.Swap(_face_request("broken", target, 32), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "failed to load" in info.value.details()
            assert stub.Swap(_face_request("good", target, 32), timeout=10).image.raw.height == 32
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()
    assert f"skipping {models / 'not-a-bundle'}: no manifest.json" in caplog.text


def test_a_server_that_cannot_serve_everything_says_so_at_start(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FACETWIN_DLIB_MODELS", str(tmp_path))  # a folder without dlib's weights
    (tmp_path / "models").mkdir()
    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(tmp_path / "models"), detector="hog",
                                       landmarks="68"))
    server.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(w.startswith(f"no model bundle in {tmp_path / 'models'}") for w in warnings), warnings
    assert any(w.startswith("full frames cannot be swapped by this server (") for w in warnings), warnings
    assert any(w.startswith("no model loaded") for w in warnings), warnings


def test_dry_run_swaps_through_real_grpc(tiny_model_dir):
    result = subprocess.run([str(SERVER), "serve", "--dry-run", "--model-dir", str(tiny_model_dir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "model tiny: ready" in result.stdout and "dry run ok: 1 model(s)" in result.stdout


def test_dry_run_fails_when_any_bundle_fails_to_load(tiny_model_dir, tmp_path):
    """A deploy check: a server that would serve some bundles but not all is not ok."""
    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir / "tiny", models / "tiny")
    shutil.copytree(tiny_model_dir / "tiny", models / "broken")
    weights = next(p for p in (models / "broken").iterdir() if p.suffix == ".onnx")
    weights.write_bytes(weights.read_bytes()[:-10])  # its sha256 no longer matches the manifest's
    result = subprocess.run([str(SERVER), "serve", "--dry-run", "--model-dir", str(models)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "model tiny: ready" in result.stdout and "model broken: FAILED" in result.stdout
    assert "1 of 2 model(s)" in result.stderr and "did not load" in result.stderr and "Traceback" not in result.stderr
    # Served: a call to the broken model is UNAVAILABLE, and tells clients' automatic retries not to ask again.
    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(models), grace_s=1.0))
    try:
        with grpc.insecure_channel(server.address) as channel:
            face = np.zeros((32, 32, 3), np.uint8)
            with pytest.raises(grpc.RpcError) as failed:
                pb_grpc.FaceSwapStub(channel).Swap(pb.SwapRequest(model="broken", target="ben", image=pb.Image(
                    raw=pb.RawImage(pixels=face.tobytes(), height=32, width=32, channels=3))), timeout=10)
    finally:
        server.stop()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and "failed to load" in failed.value.details()
    assert ("grpc-retry-pushback-ms", "-1") in failed.value.trailing_metadata()


@pytest.mark.parametrize("age_s", [1.0, 0.0], ids=["aged", "never"])
def test_old_connections_are_asked_to_reconnect_and_their_streams_run_to_the_end(tiny_model_dir, age_s):
    """Past --max-connection-age-s the server asks the client to reconnect (new replicas then get their share of a
    long-lived client); a stream running on the old connection is never cut."""
    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(tiny_model_dir), grace_s=1.0,
                                       max_connection_age_s=age_s))
    face = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    request = pb.SwapRequest(model="tiny", target="ben", image=pb.Image(raw=pb.RawImage(
        pixels=face.tobytes(), height=32, width=32, channels=3)))

    def frames():
        for i in range(8):  # ~2.4 s: past the connection's age
            time.sleep(0.3)
            yield pb.SwapStreamRequest(request=pb.SwapRequest(frame_id=i, **{f.name: v for f, v in request.ListFields()}))

    states: list[grpc.ChannelConnectivity] = []
    try:
        with grpc.insecure_channel(server.address) as channel:
            channel.subscribe(states.append)
            replies = list(pb_grpc.FaceSwapStub(channel).SwapStream(frames(), timeout=60))
            assert [r.status for r in replies] == [pb.FRAME_STATUS_OK] * 8
            time.sleep(1.5)
            assert pb_grpc.FaceSwapStub(channel).Swap(request, timeout=10).image.raw.pixels  # on a new connection
            channel.unsubscribe(states.append)
    finally:
        server.stop()
    reconnected = grpc.ChannelConnectivity.IDLE in states[states.index(grpc.ChannelConnectivity.READY):]
    assert reconnected == (age_s > 0), states


def test_healthcheck_fails_without_a_server():
    probe = subprocess.run([str(SERVER), "healthcheck", "--address", f"127.0.0.1:{_free_port()}", "--timeout", "1"],
                           capture_output=True, text=True, timeout=30)
    assert probe.returncode == 1 and "unhealthy: UNAVAILABLE" in probe.stderr


def test_missing_model_dir_is_a_clear_error(tmp_path):
    result = subprocess.run([str(SERVER), "serve", "--dry-run", "--model-dir", str(tmp_path / "nowhere")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "file").write_text("")
    result = subprocess.run([str(SERVER), "serve", "--dry-run", "--model-dir", str(tmp_path / "file")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "is a file, not a folder (--model-dir)" in result.stderr, result.stderr


def test_a_port_in_use_is_a_clear_error(tiny_model_dir, served_model):
    result = subprocess.run([str(SERVER), "serve", "--model-dir", str(tiny_model_dir), "--address",
                             served_model.address], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: could not bind {served_model.address}")
    assert "Traceback" not in result.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 60
    while True:  # NOT_SERVING (or not yet listening) until the models are warm
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, "server never became SERVING"
        time.sleep(0.1)


def test_sigterm_drains_in_flight_calls(tiny_model_dir):
    port = _free_port()
    env = dict(os.environ, FACETWIN_MODEL_DIR=str(tiny_model_dir), FACETWIN_ADDRESS=f"127.0.0.1:{port}",
               FACETWIN_GRACE_S="10")
    proc = subprocess.Popen([str(SERVER), "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            _wait_until_serving(channel)
            probe = subprocess.run([str(SERVER), "healthcheck", "--address", f"127.0.0.1:{port}"],
                                   capture_output=True, text=True, timeout=30)
            assert probe.returncode == 0 and probe.stdout.strip() == "SERVING"
            stub = pb_grpc.FaceSwapStub(channel)
            target = stub.ListModels(pb.ListModelsRequest()).models[0].identities[1]
            results: list = []
            ended: list = []

            def slow_stream():
                def frames():
                    for i in range(100):
                        time.sleep(0.03)  # keeps the stream in flight across the SIGTERM
                        request = _face_request("tiny", target, 32)
                        request.frame_id = i
                        yield pb.SwapStreamRequest(request=request)
                try:
                    for reply in stub.SwapStream(frames(), timeout=30):
                        results.append((reply.response.frame_id, reply.status))
                except grpc.RpcError as err:
                    ended.append((err.code(), err.details()))

            worker = threading.Thread(target=slow_stream)
            worker.start()
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            worker.join(30)
            # The stream stopped taking frames at once, answered every frame it had taken, then said to reconnect.
            assert 5 < len(results) < 100, results
            assert results == [(i, pb.FRAME_STATUS_OK) for i in range(len(results))], "a taken frame went unanswered"
            assert ended and ended[0][0] == grpc.StatusCode.UNAVAILABLE and "reconnect" in ended[0][1], ended
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert "draining" in log and "stopped" in log
    config_line = next(line for line in log.splitlines() if " config {" in line)
    assert json.loads(config_line.split(" config ", 1)[1])["grace_s"] == 10.0


def test_the_server_keeps_freed_memory_where_the_c_library_is_glibc():
    import platform

    from facetwin.server.server import keep_freed_memory

    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")


def test_a_second_sigterm_cuts_the_drain_short(tiny_model_dir):
    """A drain waits for every frame a stream took; a second SIGTERM (or Ctrl-C) ends those calls at once."""
    port = _free_port()
    env = dict(os.environ, FACETWIN_MODEL_DIR=str(tiny_model_dir), FACETWIN_ADDRESS=f"127.0.0.1:{port}",
               FACETWIN_GRACE_S="120", FACETWIN_DETECT_THREADS="1", FACETWIN_DETECT_MAX_SIDE="1920")
    proc = subprocess.Popen([str(SERVER), "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            _wait_until_serving(channel)
            stub = pb_grpc.FaceSwapStub(channel)
            target = stub.ListModels(pb.ListModelsRequest()).models[0].identities[1]
            blank = np.full((1080, 1920, 3), 90, np.uint8).tobytes()  # searched at full size: ~0.3 s each
            frames = [pb.SwapStreamRequest(request=pb.SwapRequest(
                model="tiny", target=target, kind=pb.IMAGE_KIND_FULL_FRAME, frame_id=i, return_region=True,
                image=pb.Image(raw=pb.RawImage(pixels=blank, height=1080, width=1920, channels=3))))
                for i in range(48)]  # the server's stream window: all taken before the first signal
            answered: list = []
            ended: list = []

            def stream():
                try:
                    for reply in stub.SwapStream(iter(frames), timeout=300):
                        answered.append(reply.response.frame_id)
                except grpc.RpcError as err:
                    ended.append(err.code())

            worker = threading.Thread(target=stream)
            worker.start()
            while not answered:  # the frames are in and being swapped, one at a time
                assert worker.is_alive(), ended
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            worker.join(60)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert "draining" in log and "stopping at once" in log and "stopped" in log, log
    assert len(answered) < 48 and ended, (answered, ended)  # frames the drain would have waited for were cut


def test_localhost_with_one_loopback_taken_is_a_port_in_use(tiny_model_dir):
    """gRPC would listen on the free one of 127.0.0.1 and ::1 only; clients reaching the other would find whatever
    holds it."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run([str(SERVER), "serve", "--model-dir", str(tiny_model_dir), "--address",
                                 f"localhost:{port}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: could not bind localhost:{port}: port {port} is in use on 127.0.0.1 (localhost is both 127.0.0.1 and "
        "::1): stop what holds it, or set --address to another port")

"""Reloading the model folder while serving: bundles added, replaced, broken and removed, with calls in flight."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from facetwin.core.bundle import manifest_sha256
from facetwin.server.config import ServerConfig
from facetwin.v1 import facetwin_pb2 as pb
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc

from ..conftest import ServerThread

SERVER = Path(sys.executable).with_name("facetwin-server")


def _request(model: str, target: str, size: int = 32) -> pb.SwapRequest:
    face = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return pb.SwapRequest(model=model, target=target, image=pb.Image(raw=pb.RawImage(
        pixels=face.tobytes(), height=size, width=size, channels=3)))


def _new_version(bundle: Path) -> str:
    """The same weights under another manifest, as a re-export writes one; returns its sha256."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["export"]["max_abs_error"] = manifest["export"]["max_abs_error"] * 2 + 1e-7
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest_sha256(bundle)


def _broken_version(bundle: Path) -> None:
    """A manifest whose files do not match it: a bundle caught half-copied."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    name = next(iter(manifest["files"]))
    manifest["files"][name] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.fixture
def models(tiny_model_dir, tmp_path) -> Path:
    folder = tmp_path / "models"
    shutil.copytree(tiny_model_dir / "tiny", folder / "m")
    return folder


@pytest.fixture
def server(models):
    served = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(models), max_delay_ms=2.0))
    yield served
    served.stop()


def _listing(stub) -> dict[str, pb.ModelInfo]:
    return {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}


def test_a_reload_serves_the_bundles_added_and_stops_serving_those_removed(server, models):
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.FaceSwapStub(channel)
        target = _listing(stub)["m"].identities[1]
        shutil.copytree(models / "m", models / "added")
        assert server.call(server.server.reload()) == {"added": "added"}
        listing = _listing(stub)
        assert set(listing) == {"m", "added"} and listing["added"].status == pb.MODEL_STATUS_READY
        assert stub.Swap(_request("added", target), timeout=10).provenance.model == "added"
        shutil.rmtree(models / "added")
        assert server.call(server.server.reload()) == {"added": "removed"}
        assert set(_listing(stub)) == {"m"}
        with pytest.raises(grpc.RpcError) as info:
            stub.Swap(_request("added", target), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "loaded models: ['m']" in info.value.details()
        assert server.call(server.server.reload()) == {}  # nothing changed: nothing loaded again
        assert stub.Swap(_request("m", target), timeout=10).image.raw.height == 32


def test_a_replaced_bundle_takes_over_without_failing_a_call(server, models):
    """Callers swap without pause while the bundle is replaced: every call succeeds, each answered by the old or the
    new version (its provenance says which), and the old version is freed once no call holds it."""
    registry = server.server.registry
    old = registry.models["m"]
    old_sha = old.manifest_sha256
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.FaceSwapStub(channel)
        target = old.manifest.identities[1]
        done, seen, errors = threading.Event(), [], []

        def caller() -> None:
            while not done.is_set():
                try:
                    seen.append(stub.Swap(_request("m", target), timeout=30).provenance.manifest_sha256)
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code()}: {exc.details()}")

        callers = [threading.Thread(target=caller) for _ in range(4)]
        for thread in callers:
            thread.start()
        try:
            while len(seen) < 20 and not errors:
                time.sleep(0.01)
            new_sha = _new_version(models / "m")
            assert server.call(server.server.reload()) == {"m": "replaced"}
            before = len(seen)
            while len(seen) < before + 20 and not errors:
                time.sleep(0.01)
        finally:
            done.set()
            for thread in callers:
                thread.join(30)
        assert not errors, errors[:3]
        assert seen[0] == old_sha and seen[-1] == new_sha and set(seen) == {old_sha, new_sha}
        assert _listing(stub)["m"].manifest_sha256 == new_sha
    deadline = time.monotonic() + 30
    while old.targets and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not old.targets and registry.models["m"].targets  # the old backends freed, the new ones serving


def test_a_call_holding_a_replaced_model_finishes_on_it_before_it_is_freed(server, models):
    registry = server.server.registry

    async def scenario() -> tuple[bool, tuple[int, ...], bool]:
        old = registry.models["m"]
        target = next(iter(old.targets.values()))
        with old.lease():  # as a call between get() and its batch
            _new_version(models / "m")
            await registry.reload()
            await asyncio.sleep(0.2)
            kept = bool(old.targets) and registry.models["m"] is not old
            (swapped, _mask), _info = await target.batcher.submit(np.zeros((32, 32, 3), np.uint8), "caller", True)
        await asyncio.wait_for(old.idle.wait(), 10)
        for _ in range(100):
            if not old.targets:
                break
            await asyncio.sleep(0.05)
        return kept, swapped.shape, not old.targets

    kept, shape, freed = server.call(scenario())
    assert kept, "the old version was freed while a call held it"
    assert shape == (32, 32, 3) and freed


def test_a_new_version_that_fails_to_load_leaves_the_old_one_serving(server, models, caplog):
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.FaceSwapStub(channel)
        before = _listing(stub)["m"]
        _broken_version(models / "m")
        assert server.call(server.server.reload()) == {"m": "kept"}
        after = _listing(stub)["m"]
        assert after.status == pb.MODEL_STATUS_READY and after.manifest_sha256 == before.manifest_sha256
        answer = stub.Swap(_request("m", before.identities[1]), timeout=10)
        assert answer.provenance.manifest_sha256 == before.manifest_sha256
    assert "model m: the new bundle failed to load, so the one loaded before" in caplog.text


def test_a_bundle_that_failed_loads_once_it_is_mended(tiny_model_dir, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir / "tiny", models / "m")
    (models / "m" / "manifest.json").rename(tmp_path / "manifest.json")
    (models / "m" / "manifest.json").write_text("{ half a manifest")
    before = {result: _loads("m", result) for result in ("ready", "failed")}
    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(models)))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.FaceSwapStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            assert _listing(stub)["m"].status == pb.MODEL_STATUS_FAILED
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            (tmp_path / "manifest.json").replace(models / "m" / "manifest.json")
            assert server.call(server.server.reload()) == {"m": "replaced"}
            listing = _listing(stub)["m"]
            assert listing.status == pb.MODEL_STATUS_READY and not listing.error
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            assert stub.Swap(_request("m", listing.identities[1]), timeout=10).image.raw.height == 32
    finally:
        server.stop()
    assert {result: _loads("m", result) - before[result] for result in before} == {"ready": 1, "failed": 1}


def _loads(model: str, result: str) -> float:
    """facetwin_model_loads_total of this (test) process."""
    return REGISTRY.get_sample_value("facetwin_model_loads_total", {"model": model, "result": result}) or 0.0


def test_a_server_that_polls_its_folder_serves_bundles_as_they_arrive_and_leave(tiny_model_dir, tmp_path):
    """--model-poll-s: no signal needed. A bundle copied in file by file, its manifest first, fails at the look that
    catches it half-copied and is served at the next, once its files are all there."""
    models = tmp_path / "models"
    models.mkdir()
    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(models), model_poll_s=1.0))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.FaceSwapStub(channel)
            (models / "m").mkdir()
            shutil.copy2(tiny_model_dir / "tiny" / "manifest.json", models / "m")
            _wait_until(lambda: "m" in _listing(stub) and _listing(stub)["m"].status == pb.MODEL_STATUS_FAILED, 30,
                        "the half-copied bundle was not looked at")
            for path in sorted((tiny_model_dir / "tiny").iterdir()):
                shutil.copy2(path, models / "m")
            _wait_until(lambda: _listing(stub)["m"].status == pb.MODEL_STATUS_READY, 30, "never READY once complete")
            assert stub.Swap(_request("m", _listing(stub)["m"].identities[1]), timeout=10).image.raw.height == 32
            shutil.rmtree(models / "m")
            _wait_until(lambda: not _listing(stub), 30, "a removed bundle is still listed")
    finally:
        server.stop()


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(what)


def test_sighup_reloads_the_model_folder_of_a_running_server(tiny_model_dir, tmp_path):
    """The operator's way in: `kill -HUP` (docker kill -s HUP), an empty folder first, then a bundle copied in."""
    models = tmp_path / "models"
    models.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    proc = subprocess.Popen([str(SERVER), "serve", "--model-dir", str(models), "--address", address],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status() -> int:
                return health.Check(health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=True).status

            assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
            shutil.copytree(tiny_model_dir / "tiny", models / "m")
            proc.send_signal(signal.SIGHUP)
            _wait_until(lambda: status() == health_pb2.HealthCheckResponse.SERVING, 60, "never SERVING")
            stub = pb_grpc.FaceSwapStub(channel)
            assert stub.Swap(_request("m", _listing(stub)["m"].identities[1]), timeout=10).image.raw.height == 32
            proc.send_signal(signal.SIGHUP)  # nothing changed: the server goes on
            time.sleep(1)
            assert proc.poll() is None and status() == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert "reloaded" in out and "m added" in out and "nothing changed" in out, out

"""`facetwin-server serve --processes N`: several serving processes on one port, as real subprocesses over loopback."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facetwin.v1 import facetwin_pb2 as pb
from facetwin.v1 import facetwin_pb2_grpc as pb_grpc

SERVER = Path(sys.executable).with_name("facetwin-server")
CONNECTIONS = 16  # dealt to 2 processes at random: all on one happens 3 times in 100,000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_dir: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen([str(SERVER), "serve", "--model-dir", str(model_dir), "--address", f"127.0.0.1:{port}",
                             "--processes", "2", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, port


def _serving_processes(parent: int) -> set[int]:
    """The serving processes of a server (the spawned children that are not multiprocessing's resource tracker)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if ppid == parent and b"resource_tracker" not in command:
            found.add(int(stat.parent.name))
    return found


def _wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _serving(port: int) -> bool:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def _connections_held(pids: set[int], port: int, state: str = "01") -> dict[int, int]:
    """Established connections to the port (state "0A": listening sockets on it) that each process holds (their
    sockets' inodes in /proc/PID/fd)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:  # 01: ESTABLISHED, 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    held = {}
    for pid in pids:
        links = []
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(FileNotFoundError):  # closed while it was read: a file of a finished call
                links.append(os.readlink(fd))
        held[pid] = sum(link in inodes for link in links)
    return held


def _swap(channel: grpc.Channel, target: str) -> pb.SwapResponse:
    face = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return pb_grpc.FaceSwapStub(channel).Swap(pb.SwapRequest(
        model="tiny", target=target,
        image=pb.Image(raw=pb.RawImage(pixels=face.tobytes(), height=32, width=32, channels=3))),
        timeout=30, wait_for_ready=True)


def _own_channel(port: int) -> grpc.Channel:
    # Channels with the same target and options share a connection unless each keeps its own pool.
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(60) == 0, proc.stdout.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.stdout.read()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads connections from Linux /proc")
def test_processes_share_the_port_its_connections_and_one_metrics_endpoint(tiny_model_dir):
    metrics_port = _free_port()
    proc, port = _start(tiny_model_dir, "--metrics-port", str(metrics_port))
    channels = []
    try:
        _wait_until(lambda: _serving(port) and len(_serving_processes(proc.pid)) == 2, 90, "never SERVING")
        children = _serving_processes(proc.pid)
        # Both listening before the connections are dealt: on a busy host one process may still be starting.
        _wait_until(lambda: all(_connections_held(children, port, "0A").values()), 90, "a process never listened")
        channels = [_own_channel(port) for _ in range(CONNECTIONS)]
        info = pb_grpc.FaceSwapStub(channels[0]).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert info.processes == 2
        target = pb_grpc.FaceSwapStub(channels[0]).ListModels(pb.ListModelsRequest(), timeout=10).models[0].identities[1]
        for channel in channels:
            _wait_until(lambda: _serving(port), 60, "a process never became SERVING")
            assert _swap(channel, target).image.raw.height == 32
        held = _connections_held(children, port)
        assert sum(held.values()) >= CONNECTIONS and all(held.values()), held  # both processes answer calls
        # One endpoint sums what every process counted.
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        swaps = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("facetwin_swaps_total{"))
        assert swaps == CONNECTIONS, text
        assert "facetwin_queue_depth" in text
    finally:
        for channel in channels:
            channel.close()
        log = _stop(proc)
    assert "serving on 127.0.0.1" in log and "with 2 processes" in log
    for name in ("p0", "p1"):  # each process's lines say which it is, and each drained on the way out
        assert f"facetwin.server [{name}]: stopped" in log, log


def test_a_serving_process_that_dies_is_started_again_while_the_other_serves(tiny_model_dir):
    proc, port = _start(tiny_model_dir)
    channels = []
    try:
        _wait_until(lambda: _serving(port) and len(_serving_processes(proc.pid)) == 2, 90, "never SERVING")
        victim, survivor = sorted(_serving_processes(proc.pid))
        _models_listed(port, victim)  # it listens: one killed before it did would stop the server instead
        channels = [_own_channel(port) for _ in range(CONNECTIONS)]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            target = pb_grpc.FaceSwapStub(channel).ListModels(pb.ListModelsRequest(), timeout=10).models[0].identities[1]
        os.kill(victim, signal.SIGKILL)
        _wait_until(lambda: len(_serving_processes(proc.pid) - {victim}) == 2, 90, "the dead process was not replaced")
        assert survivor in _serving_processes(proc.pid) and proc.poll() is None
        for channel in channels:  # every caller is served: by the survivor, or by the new process once it is warm
            _wait_until(lambda: _serving(port), 60, "never SERVING again")
            for _ in range(3):
                try:
                    _swap(channel, target)
                    break
                except grpc.RpcError as err:  # a connection that landed on the new process before it was warm
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                    time.sleep(1)
            else:
                pytest.fail("a caller was never served")
    finally:
        for channel in channels:
            channel.close()
        log = _stop(proc)
    assert f"(pid {victim}) exited with status -9; starting it again" in log, log
    assert not _serving_processes(proc.pid)


def _models_listed(port: int, until_answered_by: int) -> set[tuple[str, ...]]:
    """The model lists new connections get, until one was answered by process `until_answered_by`."""
    seen = set()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        with _own_channel(port) as channel:
            models = pb_grpc.FaceSwapStub(channel).ListModels(pb.ListModelsRequest(), timeout=30,
                                                              wait_for_ready=True).models
            seen.add(tuple(sorted(m.name for m in models)))
            if _connections_held({until_answered_by}, port)[until_answered_by]:
                return seen
    raise AssertionError(f"no connection reached process {until_answered_by}")


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads connections from Linux /proc")
def test_a_process_started_again_serves_the_bundles_its_siblings_serve(tiny_model_dir, tmp_path):
    """A bundle added to the model folder while the server runs is not served by a process started again later:
    one address must not answer NOT_FOUND or OK for the same model by the process a connection lands on."""
    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models)
    proc, port = _start(models)
    try:
        _wait_until(lambda: _serving(port) and len(_serving_processes(proc.pid)) == 2, 90, "never SERVING")
        victim, survivor = sorted(_serving_processes(proc.pid))
        _models_listed(port, victim)  # both listen: one killed before it did would stop the server instead
        shutil.copytree(models / "tiny", models / "tiny2")
        os.kill(victim, signal.SIGKILL)
        _wait_until(lambda: len(_serving_processes(proc.pid) - {victim}) == 2, 90, "the dead process was not replaced")
        (restarted,) = _serving_processes(proc.pid) - {survivor}
        assert _models_listed(port, restarted) == {("tiny",)}  # what every connection is told, whichever process
    finally:
        log = _stop(proc)
    assert "it was added after the other serving processes read the folder" in log, log


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads connections from Linux /proc")
@pytest.mark.parametrize("told_by", ["sighup", "poll"])
def test_a_reload_has_every_serving_process_serve_what_the_folder_holds_now(tiny_model_dir, tmp_path, told_by):
    """A reload (SIGHUP to the parent, or its own look at the folder) reaches every process, and a process started
    again after it serves what its siblings reloaded."""
    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models)
    proc, port = _start(models, *(["--model-poll-s", "1"] if told_by == "poll" else []))
    try:
        _wait_until(lambda: _serving(port) and len(_serving_processes(proc.pid)) == 2, 90, "never SERVING")
        first, second = sorted(_serving_processes(proc.pid))
        _models_listed(port, first)  # both listen: a signal to one still starting is sent once it does
        _models_listed(port, second)
        shutil.copytree(models / "tiny", models / ".tiny2")
        (models / ".tiny2").rename(models / "tiny2")  # in one step: a look cannot catch it half-copied
        if told_by == "sighup":
            proc.send_signal(signal.SIGHUP)
        both = {("tiny", "tiny2")}
        _wait_until(lambda: _models_listed(port, first) | _models_listed(port, second) == both, 90,
                    "a serving process did not reload")
        os.kill(first, signal.SIGKILL)
        _wait_until(lambda: len(_serving_processes(proc.pid) - {first}) == 2, 90, "the dead process was not replaced")
        (restarted,) = _serving_processes(proc.pid) - {second}
        assert _models_listed(port, restarted) == both
    finally:
        log = _stop(proc)
    assert "reloading" in log and "tiny2 added" in log, log


def test_the_serving_processes_end_with_their_parent_even_when_it_is_killed(tiny_model_dir):
    proc, port = _start(tiny_model_dir, "--grace-s", "1")
    try:
        _wait_until(lambda: _serving(port) and len(_serving_processes(proc.pid)) == 2, 90, "never SERVING")
        children = _serving_processes(proc.pid)
        proc.kill()  # SIGKILL: the parent cannot pass anything on
        proc.wait(10)
        _wait_until(lambda: not any(_running(pid) for pid in children), 60, "a serving process outlived its server")
        assert not _serving(port)
    finally:
        if proc.poll() is None:
            proc.kill()


def _running(pid: int) -> bool:
    """Whether the process exists and has not ended (a zombie has ended; no one may be left to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_a_serving_process_that_cannot_start_stops_the_server_with_its_reason(tiny_model_dir, tmp_path):
    bad = tmp_path / "server.pem"
    bad.write_text("not a certificate")
    proc, _port = _start(tiny_model_dir, "--tls-cert", str(bad), "--tls-key", str(bad))
    assert proc.wait(90) == 2
    out = proc.stdout.read()
    assert "error:" in out and "server.pem" in out, out
    assert not _serving_processes(proc.pid)


def test_a_port_in_use_stops_the_processes_before_any_starts(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([str(SERVER), "serve", "--model-dir", str(tiny_model_dir), "--processes", "2",
                                 "--address", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"could not bind 127.0.0.1:{port}" in result.stderr, result.stderr


def test_the_port_of_a_server_stopped_a_moment_ago_can_be_taken_again():
    """A stopped server's accepted connections linger in TIME_WAIT on its side for a minute: a successor started at
    once (a supervisor's restart) must still get the port."""
    from facetwin.server.processes import _reserved

    port = _free_port()
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end of the connection waits in TIME_WAIT
        time.sleep(0.1)
        client.close()
    # /proc/net/tcp: local address as IP:PORT in hex, then the remote one, then the state (06: TIME_WAIT).
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    assert any(row[1].endswith(f":{port:04X}") and row[3] == "06" for row in rows)
    with _reserved(f"127.0.0.1:{port}") as address:
        assert address == f"127.0.0.1:{port}"

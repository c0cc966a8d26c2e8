"""Faults of the real `facetwin-server` process under a running SDK stream: a SIGTERM drain and a SIGKILL, each
followed by a new server on the same address. The SDK resumes the stream on a new connection and resends what was
not answered: every frame sent gets its result, in order."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from facetwin.client import AsyncClient, Client, UnavailableError
from tests.subprocesses import command_env

SERVER = Path(sys.executable).with_name("facetwin-server")
FRAMES = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`facetwin-server serve` on a fixed loopback address, started again at will."""

    def __init__(self, model_dir: Path, port: int) -> None:
        self.env = {**command_env(), "FACETWIN_MODEL_DIR": str(model_dir), "FACETWIN_ADDRESS": f"127.0.0.1:{port}",
                    "FACETWIN_GRACE_S": "5", "FACETWIN_LOG_LEVEL": "WARNING"}
        self.address = f"127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        self.proc = subprocess.Popen([str(SERVER), "serve"], env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        with Client(self.address, timeout=2) as client:  # until the model is ready
            deadline = time.monotonic() + 90
            while True:
                try:
                    if any(m.status == "ready" for m in client.list_models()):
                        return self
                except UnavailableError:
                    pass
                assert self.proc.poll() is None, self.proc.stderr.read()
                assert time.monotonic() < deadline, "the server never got ready"
                time.sleep(0.1)

    def signal(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def server(tiny_model_dir):
    process = ServerProcess(tiny_model_dir, _free_port())
    yield process
    process.stop()


def _faces(served_model) -> list[np.ndarray]:
    source = served_model.identities[0]
    faces = served_model.sample_faces[source]
    return [faces[i % len(faces)] for i in range(FRAMES)]


def _paced(faces, after: int, event: threading.Event):
    """The frames, a little apart; `event` is set once `after` of them were read, so the fault hits mid-stream."""
    for i, face in enumerate(faces):
        if i == after:
            event.set()
        time.sleep(0.02)
        yield face


def _in_another_thread(fault, server: ServerProcess, event: threading.Event) -> threading.Thread:
    def run():
        event.wait(60)
        fault()
        server.start()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm-drain", "sigkill"])
def test_a_stream_resumes_across_a_server_restart(server, served_model, sig):
    server.start()
    faces = _faces(served_model)
    target = served_model.identities[1]
    with Client(server.address, timeout=30) as client:
        expected = [r.image for r in client.stream(faces[:4], served_model.model, target, color="rgb")]
        halfway = threading.Event()
        returned: list = []
        restarter = _in_another_thread(lambda: returned.append(server.signal(sig)), server, halfway)
        results = list(client.stream(_paced(faces, 20, halfway), served_model.model, target, color="rgb",
                                     max_in_flight=4))
        restarter.join(60)
    assert returned == [0 if sig == signal.SIGTERM else -signal.SIGKILL]  # a drain exits cleanly
    assert [r.frame_id for r in results] == list(range(FRAMES))  # every frame answered once, in order
    assert all(r.error is None and not r.dropped for r in results)
    for result, first in zip(results[:4], expected):  # the swaps are the model's, before and after the restart
        np.testing.assert_array_equal(result.image, first)
    late = len(served_model.sample_faces[served_model.identities[0]]) * 4  # the same face as frame 0, after the fault
    np.testing.assert_array_equal(results[late].image, expected[0])


@pytest.mark.parametrize("source", ["async-generator", "plain-iterable"])
def test_an_async_stream_resumes_across_a_sigterm_drain(server, served_model, source):
    """A plain iterable is pulled on the event loop, so frames are still being written when the server ends the
    call: grpc.aio then loses the server's UNAVAILABLE, and the stream must resume all the same."""
    server.start()
    faces = _faces(served_model)
    target = served_model.identities[1]
    halfway = threading.Event()
    restarter = _in_another_thread(lambda: server.signal(signal.SIGTERM), server, halfway)

    async def paced():
        for item in _paced(faces, 20, halfway):
            await asyncio.sleep(0)
            yield item

    async def main():
        frames = paced() if source == "async-generator" else _paced(faces, 20, halfway)
        async with AsyncClient(server.address, timeout=30) as client:
            return [r async for r in client.stream(frames, served_model.model, target, color="rgb", max_in_flight=4)]

    results = asyncio.run(main())
    restarter.join(60)
    assert [r.frame_id for r in results] == list(range(FRAMES))
    assert all(r.error is None and not r.dropped for r in results)


@pytest.mark.parametrize("client_class", [Client, AsyncClient])
def test_a_stream_whose_first_frame_comes_after_the_drain_began_resumes(server, served_model, client_class):
    """A stream opened just before a rolling restart: the draining server ends it at once (rather than holding
    the drain for its first frame) and asks for a reconnect, though it answered nothing; the SDK resumes."""
    server.start()
    faces = _faces(served_model)[:8]
    target = served_model.identities[1]
    restarted = threading.Event()
    exits: list[tuple[int, float]] = []

    def restart():
        time.sleep(1.0)  # the stream is open, waiting for its first frame
        began = time.monotonic()
        exits.append((server.signal(signal.SIGTERM), time.monotonic() - began))
        server.start()
        restarted.set()

    def late_frames():
        assert restarted.wait(60)
        yield from faces

    async def late_frames_async():
        while not restarted.is_set():
            await asyncio.sleep(0.05)
        for face in faces:
            yield face

    async def stream_async():
        async with AsyncClient(server.address, timeout=30) as client:
            return [r async for r in client.stream(late_frames_async(), served_model.model, target, color="rgb")]

    restarter = threading.Thread(target=restart, daemon=True)
    restarter.start()
    try:
        if client_class is Client:
            with Client(server.address, timeout=30) as client:
                results = list(client.stream(late_frames(), served_model.model, target, color="rgb"))
        else:
            results = asyncio.run(stream_async())
    finally:  # the server it starts again is the fixture's to stop, whatever happened here
        restarter.join(60)
    assert exits and exits[0][0] == 0 and exits[0][1] < 4.0  # the 5 s grace was not waited out for the stream
    assert [r.frame_id for r in results] == list(range(len(faces)))
    assert all(r.error is None and not r.dropped for r in results)


def test_without_resumes_the_stream_reports_the_server_going_away(server, served_model):
    server.start()
    halfway = threading.Event()
    restarter = threading.Thread(target=lambda: (halfway.wait(60), server.signal(signal.SIGTERM)), daemon=True)
    restarter.start()
    seen = []
    with Client(server.address, timeout=30, stream_resumes=0) as client:
        with pytest.raises(UnavailableError, match="reconnect"):
            for result in client.stream(_paced(_faces(served_model), 20, halfway), served_model.model,
                                        served_model.identities[1], color="rgb", max_in_flight=4):
                seen.append(result.frame_id)
    restarter.join(60)
    assert seen == list(range(len(seen))) and 15 < len(seen) < FRAMES  # every taken frame was answered first


def test_closing_the_client_ends_a_stream_waiting_for_its_server(server, served_model):
    """A stream whose server went away waits up to resume_timeout for it to come back; closing the client (what a
    folder run does on Ctrl-C) ends that wait at once, with CancelledError."""
    from facetwin.client import CancelledError

    server.start()
    halfway = threading.Event()
    outcome: list = []
    client = Client(server.address, timeout=120, resume_timeout=120)

    def consume():
        try:
            for _ in client.stream(_paced(_faces(served_model) * 10, 20, halfway), served_model.model,
                                   served_model.identities[1], color="rgb", max_in_flight=4):
                pass
        except Exception as exc:
            outcome.append(exc)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    assert halfway.wait(60)
    server.signal(signal.SIGKILL)  # and not restarted: the stream waits to reconnect
    time.sleep(1.0)
    assert consumer.is_alive() and not outcome  # waiting, well inside its 120 s
    client.close()
    consumer.join(30)
    assert not consumer.is_alive() and len(outcome) == 1 and isinstance(outcome[0], CancelledError), outcome


# A client process with three streams of frames in flight, killed mid-way: its connection drops with every stream
# open, as when a user's Ctrl-C ends a folder run.
CLIENT_KILLED_MID_STREAM = """
import sys, threading, numpy as np
from facetwin.client import Client
address, model, target, side = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
face = np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8)
client = Client(address, timeout=60)
def stream(n):
    for i, _ in enumerate(client.stream(iter([face] * 10_000), model, target, color="rgb", max_in_flight=8)):
        if n == 0 and i == 20:
            print("streaming", flush=True)
for n in range(3):
    threading.Thread(target=stream, args=(n,), daemon=True).start()
threading.Event().wait()
"""


def test_the_server_outlives_clients_killed_mid_stream(tiny_model_dir, served_model):
    """The calls' end is logged when the event loop closes their handlers, which may be after gRPC has freed the
    call: what the log line needs is read while the call lives (reading the peer later crashed the process). INFO
    logging, the default, is what writes those lines."""
    server = ServerProcess(tiny_model_dir, _free_port())
    server.env["FACETWIN_LOG_LEVEL"] = "INFO"
    server.start()
    try:
        for _ in range(4):
            client = subprocess.Popen([sys.executable, "-c", CLIENT_KILLED_MID_STREAM, server.address,
                                       served_model.model, served_model.identities[1], str(served_model.resolution)],
                                      stdout=subprocess.PIPE, text=True, env=command_env())
            assert client.stdout.readline().strip() == "streaming"
            client.kill()
            client.wait(30)
            time.sleep(0.5)
            assert server.proc.poll() is None, server.proc.stderr.read()[-3000:]
        with Client(server.address, timeout=30) as client:  # and still answers
            assert client.swap(served_model.sample_faces[served_model.identities[0]][0], served_model.model,
                               served_model.identities[1], color="rgb").image is not None
    finally:
        server.stop()


if os.name != "posix":  # signals
    pytestmark = pytest.mark.skip("needs POSIX signals")

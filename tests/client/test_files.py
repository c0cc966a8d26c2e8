"""The SDK's file functions on real media through the real server: whole photos and videos, faces found by the
server, timestamps, rotation and audio kept, outputs whole or absent."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import av
import numpy as np
import pytest

from facetwin.client import (
    AsyncClient,
    CancelledError,
    Client,
    MediaFileError,
    NotFoundError,
    VideoOptions,
    probe,
    swap_image_file,
    swap_image_file_async,
    swap_video_file,
    swap_video_file_async,
)
from facetwin.client.media import decode_image, encode_image

from .clips import TIME_BASE, inspect_video, jpeg_with_orientation, write_audio_only, write_clip


@pytest.fixture(scope="module")
def client(served_model):
    with Client(served_model.address) as c:
        yield c


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


def background_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean level difference of the left quarter of two frames: blue screen, no face, only the codecs' loss."""
    quarter = a.shape[1] // 4
    return float(np.abs(a[:, :quarter].astype(int) - b[:, :quarter]).mean())


def test_video_keeps_frames_rate_duration_and_audio(full_frames, client, clip, tmp_path):
    out = tmp_path / "out.mp4"
    report = swap_video_file(client, clip, out, full_frames.model, full_frames.identities[1])
    before, after = inspect_video(clip), inspect_video(out)
    assert report.frames == len(before.frames) == len(after.frames) == 24  # every H.264 frame decodes
    assert report.frames_with_faces == 24 and report.faces_swapped == 24 and report.audio_streams == 1
    assert (after.container.startswith("mov,mp4"), after.codec, after.pix_fmt) == (True, "h264", "yuv420p")
    assert after.average_rate == before.average_rate == 24
    assert after.pts == before.pts and after.time_base == before.time_base
    assert abs(after.duration - before.duration) <= 1 / 24
    assert after.audio_params == before.audio_params and after.audio_codecs == ["aac"]
    assert after.audio_packets == before.audio_packets  # same bytes, same timestamps: copied, not re-encoded
    assert all(background_error(a, b) < 2 for a, b in zip(before.frames, after.frames))  # colours kept
    # The faces were swapped: the middle of the frame changed well beyond the codecs' loss (< 2 on the background).
    middle = (slice(100, 200), slice(130, 230))
    assert np.abs(after.frames[0][middle].astype(int) - before.frames[0][middle]).mean() > 5
    (model,) = [m for m in client.list_models() if m.name == full_frames.model]
    assert after.tags["comment"] == ("DigitalSourceType=http://cv.iptc.org/newscodes/digitalsourcetype/"
                                     "trainedAlgorithmicMedia; AISystemUsed=facetwin; AISystemVersionUsed=bundle "
                                     f"manifest sha256 {model.manifest_sha256}")  # marked synthetic, as photos are
    assert "comment" not in before.tags
    assert leftovers(tmp_path) == []


def test_variable_frame_rate_and_rotation_are_kept(full_frames, client, franck, tmp_path):
    """A phone-like clip: stored turned with a display rotation, frames 1/48 s and 1/8 s apart."""
    durations = [256 if i % 3 else 1536 for i in range(12)]
    source = write_clip(tmp_path / "phone.mp4", franck[:12], durations=durations, rotation=90)
    before = inspect_video(source)
    assert (before.rotation, before.width, before.height) == (90, 360, 288)
    report = swap_video_file(client, source, tmp_path / "out.mp4", full_frames.model, full_frames.identities[1])
    after = inspect_video(tmp_path / "out.mp4")
    assert after.pts == before.pts == [sum(durations[:i]) for i in range(12)]
    assert abs(after.duration - before.duration) <= max(durations) * TIME_BASE
    # Turned upright before the server saw it (a sideways face is not found), written upright without rotation.
    assert report.frames_with_faces == 12
    assert (after.rotation, after.width, after.height) == (0, 360, 288)
    assert after.frames[0].shape == (288, 360, 3)
    assert background_error(after.frames[0], franck[0]) < 2
    assert after.audio_packets == before.audio_packets


def test_max_frames_cuts_the_audio_with_the_video(served_model, client, square_clip, tmp_path):
    options = VideoOptions(max_frames=6, crf=30, preset="ultrafast")
    report = swap_video_file(client, square_clip, tmp_path / "out.mp4", served_model.model, served_model.identities[1],
                             faces=None, options=options)  # aligned mode: no face finding, the frame goes as it is
    after = inspect_video(tmp_path / "out.mp4")
    assert report.frames == len(after.frames) == 6 and report.frames_with_faces == report.faces_swapped == 6  # crops
    end = 6 / 24
    starts = [pts / 44100 for pts, _, _ in after.audio_packets]
    assert starts and max(starts) <= end and max(starts) > end - 2 * 1024 / 44100
    assert after.audio_packets == inspect_video(square_clip).audio_packets[:len(after.audio_packets)]


@pytest.mark.parametrize("suffix", [".mp4", ".mov"])
def test_pcm_audio_with_unnamed_channels_is_copied_into_mp4_and_mov(served_model, client, tmp_path, suffix):
    """Stereo PCM in an AVI has no channel positions, which MP4 cannot store: its muxer failed at the very end,
    after every frame had been swapped. The copy takes FFmpeg's usual layout for its channel count (MOV too), the
    samples as they were."""
    faces = served_model.sample_faces[served_model.identities[0]][:4]
    source = write_clip(tmp_path / "camera.avi", faces, audio_codec="pcm_s16le", audio_layout="stereo")
    assert [channel.name for channel in av.open(str(source)).streams.audio[0].layout.channels] == ["NONE", "NONE"]
    report = swap_video_file(client, source, tmp_path / f"out{suffix}", served_model.model,
                             served_model.identities[1], faces=None)
    after, before = inspect_video(tmp_path / f"out{suffix}"), inspect_video(source)
    assert report.frames == len(after.frames) == 4 and report.audio_streams == 1
    assert after.audio_codecs == ["pcm_s16le"]
    assert [md5 for _, _, md5 in after.audio_packets] == [md5 for _, _, md5 in before.audio_packets]


def test_frame_count_of_a_container_that_records_none(served_model, tmp_path):
    """MKV stores no frame count; the count comes from the video's own length, not the container's, which also
    covers audio running past the last picture."""
    faces = served_model.sample_faces[served_model.identities[0]][:10]
    info = probe(write_clip(tmp_path / "clip.mkv", faces, audio_seconds=1.0))
    assert info.frames == 10 and info.duration == pytest.approx(10 / 24, abs=1e-3)  # MKV keeps milliseconds


def test_photos_whole_turned_upright_in_any_format(full_frames, client, franck, tmp_path):
    target = full_frames.identities[1]
    phone = tmp_path / "phone.jpg"
    phone.write_bytes(jpeg_with_orientation(franck[0]))
    assert probe(phone).width == 360 and probe(phone).height == 288  # EXIF orientation read
    report = swap_image_file(client, phone, tmp_path / "out.png", full_frames.model, target, mask=tmp_path / "m.jpg")
    result = decode_image((tmp_path / "out.png").read_bytes())
    assert result.shape == (288, 360, 3) and report.faces_swapped == report.max_faces == 1
    assert background_error(result, franck[0]) < 2
    mask = decode_image((tmp_path / "m.jpg").read_bytes(), grey=True)  # converted to the JPEG its name asks for
    assert (tmp_path / "m.jpg").read_bytes()[:3] == b"\xff\xd8\xff" and mask.shape == (288, 360) and mask.max() > 200
    # A format the server does not read (WebP) is decoded here and sent as PNG; JPEG quality reaches the server.
    webp = tmp_path / "still.webp"
    with open(webp, "wb") as file:
        import av

        context = av.CodecContext.create("libwebp", "w")
        context.width, context.height, context.pix_fmt = 360, 288, "yuv420p"
        frame = av.VideoFrame.from_ndarray(franck[3], format="rgb24").reformat(format="yuv420p")
        file.write(b"".join(bytes(p) for p in context.encode(frame) + context.encode(None)))
    sizes = []
    for quality in (30, 95):
        out = tmp_path / f"q{quality}.jpg"
        assert swap_image_file(client, webp, out, full_frames.model, target, quality=quality).faces_swapped == 1
        sizes.append(out.stat().st_size)
    assert sizes[0] < sizes[1]
    assert leftovers(tmp_path) == []


def test_png_and_jpeg_photos_need_only_the_base_install(full_frames, franck, tmp_path):
    """Without PyAV a PNG/JPEG photo still swaps (the server decodes it); anything else says what to install."""
    photo, webp = tmp_path / "photo.png", tmp_path / "photo.webp"
    photo.write_bytes(encode_image(franck[0], "png"))
    webp.write_bytes(b"RIFF\x00\x00\x00\x00WEBPVP8 ")
    code = (
        "import sys\n"
        "sys.modules['av'] = None  # any import of PyAV now fails\n"
        "from facetwin.client import Client, FaceTwinError, swap_image_file\n"
        f"with Client({full_frames.address!r}) as client:\n"
        f"    report = swap_image_file(client, {str(photo)!r}, {str(tmp_path / 'out.jpg')!r}, "
        f"{full_frames.model!r}, {full_frames.identities[1]!r})\n"
        "    print('swapped', report.faces_swapped)\n"
        "    try:\n"
        f"        swap_image_file(client, {str(webp)!r}, {str(tmp_path / 'w.png')!r}, 'm', 't')\n"
        "    except FaceTwinError as exc:  # the SDK's own error, saying what to install\n"
        "        print(type(exc).__name__, exc)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "swapped 1" in run.stdout and "MissingPyAVError" in run.stdout and "pip install 'facetwin[cli]'" in run.stdout
    assert f"{webp}: " in run.stdout  # names the file
    assert (tmp_path / "out.jpg").read_bytes()[:3] == b"\xff\xd8\xff" and not (tmp_path / "w.png").exists()


def test_async_twins(full_frames, clip, franck, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode_image(franck[5], "png"))

    async def run():
        async with AsyncClient(full_frames.address) as client:
            video = await swap_video_file_async(client, clip, tmp_path / "out.mp4", full_frames.model,
                                                full_frames.identities[1], options=VideoOptions(max_frames=8))
            image = await swap_image_file_async(client, photo, tmp_path / "out.jpg", full_frames.model,
                                                full_frames.identities[1], faces="all")
            return video, image

    video, image = asyncio.run(run())
    assert video.frames == len(inspect_video(tmp_path / "out.mp4").frames) == 8 and video.frames_with_faces == 8
    assert image.faces_swapped == 1 and decode_image((tmp_path / "out.jpg").read_bytes()).shape == (288, 360, 3)
    assert leftovers(tmp_path) == []


def test_files_that_cannot_be_used_say_why(served_model, client, clip, tmp_path):
    model, target = served_model.model, served_model.identities[1]
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    with pytest.raises(MediaFileError, match="is not an image or video"):
        swap_video_file(client, notes, tmp_path / "a.mp4", model, target)
    with pytest.raises(MediaFileError, match="is not an image or video"):
        swap_image_file(client, notes, tmp_path / "a.png", model, target)
    with pytest.raises(MediaFileError, match=r"has no video stream \(only audio: aac\)"):
        swap_video_file(client, write_audio_only(tmp_path / "tone.m4a"), tmp_path / "b.mp4", model, target)
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode_image(np.zeros((32, 32, 3), np.uint8), "png"))
    with pytest.raises(MediaFileError, match="is a photo, not a video"):
        swap_video_file(client, photo, tmp_path / "c.mp4", model, target)
    with pytest.raises(MediaFileError, match="cannot be written: .*notes.txt is a file"):
        swap_video_file(client, clip, notes / "d.mp4", model, target)
    with pytest.raises(MediaFileError, match="must end in .mp4"):
        swap_video_file(client, clip, tmp_path / "e.webm", model, target)
    with pytest.raises(MediaFileError, match="no such file"):
        swap_video_file(client, tmp_path / "missing.mp4", tmp_path / "f.mp4", model, target)
    flac = write_clip(tmp_path / "flac.mkv", served_model.sample_faces[served_model.identities[0]][:3],
                      audio_codec="flac")
    with pytest.raises(MediaFileError, match="may not hold the input's flac audio: write .mkv"):
        swap_video_file(client, flac, tmp_path / "h.mov", model, target, faces=None)
    # A failure on the server side, after the output was opened, leaves nothing either.
    with pytest.raises(NotFoundError, match="nobody"):
        swap_video_file(client, clip, tmp_path / "g.mp4", model, "nobody")
    with pytest.raises(NotFoundError, match="nobody"):
        swap_image_file(client, photo, tmp_path / "g.png", model, "nobody")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flac.mkv", "notes.txt", "photo.png", "tone.m4a"]


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"], ids=["frame-count", "duration"])
def test_a_video_cut_off_before_its_declared_end_is_refused(served_model, client, franck, tmp_path, suffix):
    """A cut-off download decodes without an error up to the cut; its swap must not pass for the whole video."""
    whole = write_clip(tmp_path / f"whole{suffix}", [frame[:, 36:324] for frame in franck] * 2, faststart=True)
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) * 6 // 10])
    model, target = served_model.model, served_model.identities[1]
    with pytest.raises(MediaFileError, match="its header declares could be read: the file is cut off or damaged"):
        swap_video_file(client, cut, tmp_path / "out.mkv", model, target)
    assert not (tmp_path / "out.mkv").exists() and leftovers(tmp_path) == []
    report = swap_video_file(client, whole, tmp_path / "out.mkv", model, target)  # the whole file is not refused
    assert report.frames == 2 * len(franck)


def test_a_mask_written_over_the_output_is_refused(served_model, client, tmp_path):
    photo = tmp_path / "face.png"
    photo.write_bytes(encode_image(served_model.sample_faces[served_model.identities[0]][0], "png"))
    with pytest.raises(MediaFileError, match="is also the output"):
        swap_image_file(client, photo, tmp_path / "out.png", served_model.model, served_model.identities[1],
                        mask=tmp_path / "." / "out.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["face.png"]


def test_cancel_stops_and_leaves_nothing(served_model, client, square_clip, tmp_path):
    cancel, written = threading.Event(), []

    def progress(frames: int) -> None:
        written.append(frames)
        if len(written) == 3:
            cancel.set()

    with pytest.raises(CancelledError):
        swap_video_file(client, square_clip, tmp_path / "out.mp4", served_model.model, served_model.identities[1],
                        faces=None, progress=progress, cancel=cancel)
    assert len(written) == 3 and list(tmp_path.iterdir()) == []

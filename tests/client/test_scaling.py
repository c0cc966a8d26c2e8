"""Whole frames over a server's limits, through real servers started with small limits: sent scaled, blended back
into the caller's frame at full resolution, the untouched pixels exactly the caller's."""

from __future__ import annotations

import asyncio
import dataclasses

import cv2
import numpy as np
import pytest

from facetwin.client import (
    AnswerTooLargeError,
    AsyncClient,
    Client,
    ResourceExhaustedError,
    swap_image_file,
    swap_image_file_async,
)
from facetwin.client.files import photo_scale
from facetwin.client.media import decode_image, decode_photo, encode_image
from facetwin.client.scaling import FrameLimits, downscale, fit_scale, upscale
from facetwin.server.config import ServerConfig

from ..conftest import ServerThread
from .clips import inspect_video, write_clip
from .test_cli import run_cli


def start_server(served_model, **limits) -> ServerThread:
    return ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(served_model.model_dir), max_delay_ms=2.0,
                                     grace_s=1.0, **limits))


@pytest.fixture(scope="module")
def small_messages(served_model):
    """A server that takes messages of 1 MiB: a raw 720x576 frame (1.2 MB) does not fit."""
    server = start_server(served_model, max_message_mb=1)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small_images(served_model):
    """A server that takes images of at most 512 pixels a side: a 720x576 photo is refused."""
    server = start_server(served_model, max_image_side=512)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def big_frame(franck) -> np.ndarray:
    """franck.mp4's first frame at twice its size, 720x576."""
    return cv2.resize(franck[0], (720, 576), interpolation=cv2.INTER_CUBIC)


def assert_blended_back(result, frame: np.ndarray) -> None:
    """Full size; every pixel outside the mask is the frame's own, exactly; the face changed."""
    assert result.sent_scale == 2 and "sent at 1/2 scale: larger than the server's 1 MiB messages" == result.scale_note
    assert result.image.shape == frame.shape and result.mask.shape == frame.shape[:2]
    untouched = result.mask == 0
    assert untouched.mean() > 0.8
    assert np.array_equal(result.image[untouched], frame[untouched])
    x0, y0, x1, y1 = result.region
    outside = np.ones(frame.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(result.image[outside], frame[outside])
    face = result.mask > 200
    assert np.abs(result.image[face].astype(int) - frame[face]).mean() > 5


def test_a_frame_over_the_message_limit_is_sent_at_half_scale(full_frames, small_messages, franck, big_frame):
    target = full_frames.identities[1]
    with Client(small_messages.address) as client:
        result = client.swap(big_frame, full_frames.model, target, color="rgb", faces="largest", return_mask=True)
        assert_blended_back(result, big_frame)
        # The same face found in the frame at its own size, where it fits: boxes and points come back in the big
        # frame's pixels, twice the small frame's.
        own = client.swap(franck[0], full_frames.model, target, color="rgb", faces="largest")
    assert own.sent_scale == 1 and own.scale_note == ""
    (face,), (small,) = result.faces, own.faces
    assert face.swapped and np.allclose(face.box, np.array(small.box) * 2, atol=4)
    assert np.abs(face.landmarks - (small.landmarks * 2 + 0.5)).mean() < 2
    centre_x, centre_y = face.landmarks.mean(axis=0)  # the face's middle lies in the changed region
    x0, y0, x1, y1 = result.region
    assert x0 < centre_x < x1 and y0 < centre_y < y1


def test_streams_and_the_async_client_scale_too(full_frames, small_messages, big_frame):
    target = full_frames.identities[1]
    frames = [big_frame, np.ascontiguousarray(big_frame[::-1])]
    with Client(small_messages.address) as client:
        results = list(client.stream(frames, full_frames.model, target, color="rgb", faces="largest",
                                     return_mask=True))
    for result, frame in zip(results, frames):
        assert_blended_back(result, frame)
    without_mask = None

    async def run():
        nonlocal without_mask
        async with AsyncClient(small_messages.address) as client:
            async for result in client.stream([big_frame], full_frames.model, target, color="rgb", faces="largest"):
                without_mask = result
            return await client.swap(big_frame, full_frames.model, target, color="rgb", faces="largest",
                                     return_mask=True)

    assert_blended_back(asyncio.run(run()), big_frame)
    assert without_mask.mask is None and without_mask.sent_scale == 2  # the mask asked for the blend is not handed on
    assert without_mask.image.shape == big_frame.shape


def test_aligned_crops_are_never_scaled(served_model, small_messages):
    crop = cv2.resize(served_model.sample_faces[served_model.identities[0]][0], (600, 600))  # 1.08 MB raw
    with Client(small_messages.address) as client, pytest.raises(ResourceExhaustedError):
        client.swap(crop, served_model.model, served_model.identities[1], color="rgb")


def test_fit_scale_picks_the_smallest_factor_that_fits():
    uhd = FrameLimits(message_bytes=16 * 2**20, max_side=4096, max_pixels=4096 * 4096, frame_memory_bytes=2**30)
    assert fit_scale(2160, 3840, uhd, 64 * 1024) == (2, "larger than the server's 16 MiB messages")
    assert fit_scale(1080, 1920, uhd, 64 * 1024) == (1, "")
    # 8064x6048: over 4096 a side; at 1/2 its answer (region and mask, 4 bytes a pixel) is 48.8 MB, at 1/3 21.7 MB.
    assert fit_scale(6048, 8064, uhd, 64 * 1024) == (4, "over the server's 4096 pixels per side")
    mine = FrameLimits(message_bytes=4 * 2**20, max_side=0, max_pixels=0, frame_memory_bytes=0, client_limits=True)
    assert fit_scale(1080, 1920, mine, 0)[1] == "larger than this client's max_message_mb 4 MiB messages"
    assert fit_scale(1000, 1000, FrameLimits(0, 5, 0, 0), 0) == (0, "over the server's 5 pixels per side")  # below 8 a side


def test_box_average_down_and_bilinear_up():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (7, 9, 3), np.uint8)
    small = downscale(image, 2)
    assert small.shape == (4, 5, 3)
    assert np.array_equal(small[0, 0], np.rint(image[:2, :2].reshape(-1, 3).mean(0)).astype(np.uint8))
    assert np.array_equal(small[3, 4], image[6, 8])  # the edge padded with itself
    flat = np.full((4, 5), 77, np.uint8)
    assert np.array_equal(upscale(flat, 3, 11, 14), np.full((11, 14), 77.0, np.float32))
    ramp = np.arange(5, dtype=np.uint8)[None, :].repeat(2, 0)  # 0 1 2 3 4 across
    up = upscale(ramp, 2, 4, 10)[0]
    assert up[1] == 0.25 and up[2] == 0.75 and up[0] == 0 and up[-1] == 4  # smooth between centres, flat past them


def test_a_photo_over_the_servers_side_is_finished_here_at_full_size(full_frames, small_images, big_frame, tmp_path):
    photo = tmp_path / "big.jpg"
    photo.write_bytes(encode_image(big_frame, "jpeg", quality=95))
    original = decode_photo(photo)
    target = full_frames.identities[1]
    with Client(small_images.address) as client:
        report = swap_image_file(client, photo, tmp_path / "out.png", full_frames.model, target,
                                 mask=tmp_path / "mask.png")
        sizes = [swap_image_file(client, photo, tmp_path / f"q{quality}.jpg", full_frames.model, target,
                                 quality=quality).sent_scale for quality in (30, 95)]
    assert report.sent_scale == 2 and report.faces_swapped == 1
    assert report.scale_note == "sent at 1/2 scale: over the server's 512 pixels per side"
    written = (tmp_path / "out.png").read_bytes()
    assert b"trainedAlgorithmicMedia" in written  # marked as synthetic, like the photos the server encodes
    out, mask = decode_image(written), decode_image((tmp_path / "mask.png").read_bytes(), grey=True)
    assert out.shape == original.shape == (576, 720, 3) and mask.shape == (576, 720)
    assert (mask == 0).mean() > 0.8 and np.array_equal(out[mask == 0], original[mask == 0])
    assert np.abs(out[mask > 200].astype(int) - original[mask > 200]).mean() > 5
    assert sizes == [2, 2]
    jpegs = [(tmp_path / f"q{quality}.jpg").read_bytes() for quality in (30, 95)]
    assert len(jpegs[0]) < len(jpegs[1]) and all(b"trainedAlgorithmicMedia" in jpeg for jpeg in jpegs)
    assert decode_image(jpegs[1]).shape == (576, 720, 3)

    async def run():
        async with AsyncClient(small_images.address) as client:
            return await swap_image_file_async(client, photo, tmp_path / "async.png", full_frames.model, target)

    assert asyncio.run(run()).sent_scale == 2
    assert np.array_equal(decode_image((tmp_path / "async.png").read_bytes()), out)


def test_photo_scale_counts_a_png_answer_of_a_photo_that_fits(tmp_path):
    """A 12 MP phone JPEG fits a 16 MiB message; its PNG answer (near the raw 36 MB) cannot come back whole."""
    photo = encode_image(np.zeros((3000, 4000, 3), np.uint8), "jpeg")
    uhd = FrameLimits(message_bytes=16 * 2**20, max_side=4096, max_pixels=4096 * 4096, frame_memory_bytes=2**30)
    assert photo_scale(photo, uhd, "largest", "jpeg") == (1, "")
    assert photo_scale(photo, uhd, "largest", "png") == (2, "its PNG answer could be larger than the server's 16 MiB "
                                                            "messages")
    assert photo_scale(photo, uhd, None, "png") == (1, "")  # an aligned crop is never scaled
    # Pixels that fit a message go as they are (their answer is the changed region); the mask counts in the answer.
    roomy = dataclasses.replace(uhd, message_bytes=35 * 2**20)  # 36.7 MB: 12 MP of RGB, not RGB and a mask
    assert photo_scale(photo, roomy, "largest", "png") == (1, "")
    assert photo_scale(photo, roomy, "largest", "png", mask=True) == (1, "its PNG answer could be larger than the "
                                                                         "server's 35 MiB messages")


def test_a_jpeg_photo_asked_for_as_png_comes_back_whole(full_frames, small_messages, big_frame, tmp_path):
    """The photo's JPEG (~0.35 MB) fits the server's 1 MiB messages; its PNG answer (~1.6 MB) would not."""
    rng = np.random.default_rng(0)
    frame = cv2.resize(big_frame, (1024, 800), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    frame = np.clip(frame + rng.integers(-12, 13, frame.shape), 0, 255).astype(np.uint8)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(encode_image(frame, "jpeg", quality=95))
    original = decode_photo(photo)
    assert photo.stat().st_size < 2**20 < len(encode_image(original, "png"))
    target = full_frames.identities[1]
    with Client(small_messages.address) as client:
        report = swap_image_file(client, photo, tmp_path / "out.png", full_frames.model, target,
                                 mask=tmp_path / "mask.png")
        as_jpeg = swap_image_file(client, photo, tmp_path / "out.jpg", full_frames.model, target)
    assert as_jpeg.sent_scale == 1 and as_jpeg.faces_swapped == 1  # a JPEG answer comes back from the server
    assert report.sent_scale == 2 and report.faces_swapped == 1
    written = (tmp_path / "out.png").read_bytes()
    assert len(written) > 2**20 and b"trainedAlgorithmicMedia" in written
    out, mask = decode_image(written), decode_image((tmp_path / "mask.png").read_bytes(), grey=True)
    assert out.shape == original.shape and mask.shape == original.shape[:2]
    assert (mask == 0).mean() > 0.8 and np.array_equal(out[mask == 0], original[mask == 0])
    dry = run_cli("swap", photo, tmp_path / "dry.png", "-m", full_frames.model, "-t", target,
                  "-a", small_messages.address, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "sent at 1/2 scale: its PNG answer could be larger than the server's 1 MiB messages" in dry.stdout


def test_the_cli_sends_a_video_scaled_and_its_dry_run_says_so(full_frames, small_messages, franck, tmp_path):
    clip = write_clip(tmp_path / "big.mp4", [cv2.resize(frame, (720, 576)) for frame in franck[:6]], audio=False)
    args = ("swap", clip, tmp_path / "out.mp4", "-m", full_frames.model, "-t", full_frames.identities[1],
            "-a", small_messages.address)
    dry = run_cli(*args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "sent at 1/2 scale: larger than the server's 1 MiB messages" in dry.stdout
    assert "audio" not in dry.stdout.split("->")[-1]  # no audio to copy
    run = run_cli(*args)
    assert run.returncode == 0, run.stderr
    assert "6 frame(s), 6 with a face" in run.stdout
    assert "sent at 1/2 scale: larger than the server's 1 MiB messages" in run.stdout
    facts = inspect_video(tmp_path / "out.mp4")
    assert (facts.width, facts.height, len(facts.frames)) == (720, 576, 6)


def test_a_photo_whose_answer_outgrows_the_message_limit_is_sent_again_as_pixels(full_frames, small_messages, franck,
                                                                                 tmp_path):
    """A noisy photo stored at JPEG quality 50 fits the 1 MiB messages; its answer at quality 100 does not, which
    only the server's work can tell. The SDK then sends its pixels (scaled to fit), answered by the changed region."""
    noise = np.random.default_rng(0).normal(0, 30, (1120, 1400, 3))
    photo = np.clip(cv2.resize(franck[0], (1400, 1120), interpolation=cv2.INTER_CUBIC) + noise, 0, 255).astype(np.uint8)
    source = tmp_path / "noisy.jpg"
    source.write_bytes(encode_image(photo, "jpeg", quality=50))
    assert source.stat().st_size < 900_000
    with Client(small_messages.address) as client:
        with pytest.raises(AnswerTooLargeError) as refused:  # the file's bytes as they are
            client.swap(source.read_bytes(), full_frames.model, full_frames.identities[1], color="rgb",
                        encoding="jpeg", jpeg_quality=100, faces="largest")
        assert refused.value.answer_bytes > 1 << 20 and "over the server's message limit" in refused.value.details
        report = swap_image_file(client, source, tmp_path / "out.jpg", full_frames.model, full_frames.identities[1],
                                 quality=100)
    assert report.sent_scale > 1 and report.frames == 1
    swapped = decode_photo(tmp_path / "out.jpg")
    assert swapped.shape == photo.shape
    assert b"trainedAlgorithmicMedia" in (tmp_path / "out.jpg").read_bytes()[:4096]  # marked as the server marks

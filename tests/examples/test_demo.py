"""`python -m examples.demo` end to end: synth -> train -> export -> serve -> swap through the SDK."""

from __future__ import annotations

import json

import cv2
import pytest

from tests.subprocesses import run_module


@pytest.mark.slow
def test_tiny_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "out"
    run = run_module("examples.demo", "--preset", "tiny", "--out", str(out), "--clip-frames", "8",
                     "--eval-poses", "4")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr

    report = json.loads((out / "demo_report.json").read_text())
    swap = report["ground_truth_swap"]
    assert swap["poses_per_direction"] == 4
    for key in ("ssim", "ssim_face"):
        assert -1.0 <= swap[key] <= 1.0
    assert 0.0 <= swap["l1"] <= 1.0
    assert len(swap["per_direction"]) == 2 and all("->" in pair for pair in swap["per_direction"])
    assert report["clip_frames"] == 8 and report["server_ms_per_swap"] > 0

    grid = cv2.imread(str(out / "swap_grid.png"))
    # Six rows (A, A->B, true B and back) of up to 8 faces at 32 px, scaled up: a real picture, not a stub.
    assert grid is not None and grid.shape[0] >= 6 * 32 and grid.shape[1] >= 4 * 32 and grid.std() > 5
    clip = cv2.VideoCapture(str(out / "swap_clip.mp4"))
    frames = []
    while True:
        ok, frame = clip.read()
        if not ok:
            break
        frames.append(frame)
    clip.release()
    assert len(frames) == 8 and frames[0].shape[1] == 2 * frames[0].shape[0]  # source | swap, side by side
    assert report["files"]["grid"] == str(out / "swap_grid.png")
    assert (out / "models" / "demo" / "manifest.json").is_file() and (out / "run" / "checkpoint.pt").is_file()

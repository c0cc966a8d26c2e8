"""bench/soak.py for a few seconds: many streams with push-back against a real server lose no frame and see no
error, and the report carries latency windows and the server's memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_short_soak_loses_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--model-dir", str(tiny_model_dir),
                          "--streams", "6", "--seconds", "4", "--json", str(out)],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:] + run.stdout[-2000:]
    report = json.loads(out.read_text())
    assert report["frames_sent"] > 6 and report["frames_lost"] == 0 and report["errors"] == 0
    assert report["frames_answered"] == report["frames_sent"]
    assert report["latency_windows"] and report["rss_mb"]


@pytest.mark.slow
def test_a_soak_through_reloads_is_answered_by_every_version_and_loses_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "soak.json"
    before = (tiny_model_dir / "tiny" / "manifest.json").read_bytes()
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--model-dir", str(tiny_model_dir),
                          "--streams", "4", "--seconds", "6", "--reload-every", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:] + run.stdout[-2000:]
    report = json.loads(out.read_text())
    assert report["reloads"] >= 3 and report["frames_lost"] == 0 and report["errors"] == 0
    assert all(report["frames_per_version"][:-1]) and not report["unknown_versions"]
    assert report["versions_that_answered"] >= report["reloads"]
    assert len(report["rss_before_reload_mb"]) == report["reloads"]  # the server's memory between reloads
    assert (tiny_model_dir / "tiny" / "manifest.json").read_bytes() == before  # versions were made in a copy

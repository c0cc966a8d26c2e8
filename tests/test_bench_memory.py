"""bench/memory.py on a small burst: the server starts with each setting, every call is answered, and the report
carries the peak memory of each run against the unbounded one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_small_burst_reports_peak_memory_per_setting(tiny_model_dir, tmp_path):
    out = tmp_path / "memory.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--model-dir", str(tiny_model_dir),
                          "--calls", "6", "--side", "512", "--frame-memory-mb", "0,1", "--json", str(out)],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:] + run.stdout[-2000:]
    report = json.loads(out.read_text())
    assert report["image"]["decoded_mib"] == 0.8 and report["calls"] == 6
    assert [r["frame_memory_mb"] for r in report["runs"]] == [0, 1]
    for result in report["runs"]:
        assert result["codes"] == {"OK": 6}
        assert result["peak_mb"] >= result["idle_mb"] > 0
    assert report["runs"][0]["growth_vs_unbounded"] == 1.0


def test_streams_of_raw_frames_report_every_frame(tiny_model_dir, tmp_path):
    out = tmp_path / "memory.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--model-dir", str(tiny_model_dir),
                          "--kind", "stream", "--streams", "2", "--frames", "3", "--side", "512",
                          "--frame-memory-mb", "0,1", "--json", str(out)], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:] + run.stdout[-2000:]
    report = json.loads(out.read_text())
    assert report["streams"] == [2, 3] and report["calls"] is None
    assert [r["codes"] for r in report["runs"]] == [{"FRAME_STATUS_OK": 6}] * 2

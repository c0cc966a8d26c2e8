"""bench/train.py in its smoke mode: real input pipeline vs preloaded batches, the JSON shape (no timing checks)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from facetwin.training import synth

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "train.py"
MODES = ("real_input", "preloaded", "input_only")


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "bench_train.json"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    run = subprocess.run([sys.executable, str(BENCH), "--smoke", "--device", "cpu", "--json", str(out), *args],
                         capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    report = json.loads(out.read_text())
    assert json.loads(run.stdout) == report  # the same report on stdout
    return report


def _positive(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def _check_shape(report: dict, repeats: int) -> None:
    assert report["bench"] == "train" and report["mode"] == "smoke"
    host = report["host"]
    assert host["cpus"] >= 1 and host["torch"]
    assert len(host["loadavg_start"]) == 3 and len(host["loadavg_end"]) == 3
    assert report["config"]["device"] == "cpu"
    assert report["steps_per_measurement"] == 3
    assert len(report["repetitions"]) == repeats
    for i, rep in enumerate(report["repetitions"]):
        assert sorted(rep["order"]) == sorted(MODES)
        assert rep["order"] == (list(MODES) if i % 2 == 0 else list(MODES[::-1]))  # alternating: drift cancels
        for mode in MODES:
            assert rep[mode]["steps"] == 3
            assert _positive(rep[mode]["seconds"]) and _positive(rep[mode]["per_s"])
        assert _positive(rep["ratio"]) and _positive(rep["ratio_cpu_time"])
    for mode in MODES:
        assert _positive(report["per_s"][mode]) and _positive(report["ms_per_step"][mode])
    for key in ("ratio", "ratio_pooled", "ratio_min", "ratio_max", "ratio_cpu_time"):
        assert _positive(report[key]), key
    assert report["ratio_min"] <= report["ratio"] <= report["ratio_max"]
    assert report["target_ratio"] == 0.85
    assert report["meets_target"] == (report["ratio"] >= 0.85)


@pytest.mark.slow
def test_smoke_on_a_generated_set(tmp_path):
    report = _run(tmp_path, "--preset", "tiny")
    _check_shape(report, repeats=2)
    config = report["config"]
    assert config["preset"] == "tiny" and config["variant"] == "ae" and config["resolution"] == 32
    assert config["data"]["kind"] == "synth" and set(config["data"]["faces_per_identity"].values()) == {8}


@pytest.mark.slow
def test_given_data_set_and_adversarial_variant(tmp_path):
    data = synth.write_dataset(tmp_path / "data", identities=2, images=6, size=32, seed=1, progress=False)
    report = _run(tmp_path, "--preset", "tiny", "--variant", "vae-gan", "--data", str(data), "--repeats", "3",
                  "--batch-size", "2")
    _check_shape(report, repeats=2)  # --smoke caps the repetitions at 2
    config = report["config"]
    assert config["variant"] == "vae-gan" and config["batch_size_per_identity"] == 2
    assert config["data"]["dir"] == str(data) and len(config["identities"]) == 2

"""bench/serve.py over TLS for one short round: the server speaks TLS with the run's throwaway certificate and every
phase's client, the load processes included, reaches it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_short_serving_bench_runs_over_tls(tiny_model_dir, tmp_path):
    out = tmp_path / "serve.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--model-dir", str(tiny_model_dir),
                          "--tls", "--seconds", "1", "--repeats", "1", "--concurrency", "4", "--streams", "2",
                          "--latency-calls", "5", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:] + run.stdout[-2000:]
    report = json.loads(out.read_text())
    assert report["server"]["tls"] is True
    for phase in ("served_unary", "served_stream", "served_streams"):
        assert report[phase]["per_s"] > 0, report[phase]
    assert report["latency_single_call"]["calls"] == 5 and report["latency_single_stream"]["calls"] == 5

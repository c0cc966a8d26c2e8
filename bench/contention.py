#!/usr/bin/env python3
"""Speed when the machine is shared: training steps/s and served faces/s alone, then beside one busy process.

The busy process is a single-threaded Python loop (one core's worth of someone else's work). Reported per phase:
the rate alone, the rate beside it, and the slowdown (alone / beside). Training is measured with the default
(threads follow the free cores, training/cpu_share.py) and with --fixed-threads (two threads whatever happens).
The goal: a slowdown of at most ~2x, keeping the speed alone. Measure on an otherwise idle machine.

    python bench/contention.py --model-dir out/models --json out/bench_contention.json
    python bench/contention.py --model-dir out/models --seconds 3 --smoke      # seconds, numbers mean little
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from facetwin.core.bundle import BundleError, load_manifest, pick_bundle
from facetwin.v1 import facetwin_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import run_load  # noqa: E402  (bench/load.py)
from report import host_info, write_report  # noqa: E402  (bench/report.py)
from serve import make_request, start_server, stop_server  # noqa: E402  (bench/serve.py)

BIN = Path(sys.executable).parent
BUSY_LOOP = "while True: pass"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="out/models", help="bundles for the serving phase (make demo's)")
    p.add_argument("--model", default=None)
    p.add_argument("--seconds", type=float, default=30.0, help="length of each measurement")
    p.add_argument("--concurrency", type=int, default=32, help="unary calls in flight in the serving phase")
    p.add_argument("--preset", default="demo", help="training preset of the training phase")
    p.add_argument("--smoke", action="store_true", help="tiny data and the tiny preset: checks the script only")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args()
    args.backend, args.max_batch, args.max_delay_ms, args.inference_workers = "onnxruntime", 16, 2.0, 0
    args.detect_threads, args.keep_shape = 1, None
    return args


class Busy:
    """One single-threaded busy loop for the length of a `with` block."""

    def __enter__(self) -> "Busy":
        self.proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait(10)


def training_rate(data: Path, out: Path, args: argparse.Namespace, fixed: bool) -> float:
    """Steps/s of `facetwin-train train` over --seconds, from its own summary (the loop's time only)."""
    preset = "tiny" if args.smoke else args.preset
    cmd = [str(BIN / "facetwin-train"), "train", "--data", str(data), "--out", str(out), "--preset", preset,
           "--steps", "1000000", "--max-seconds", str(args.seconds), "--no-tensorboard"]
    subprocess.run(cmd + (["--fixed-threads"] if fixed else []), check=True, capture_output=True)
    summary = json.loads((out / "train_summary.json").read_text())
    return summary["steps_trained"] / summary["seconds"]


def serving_rate(address: str, payloads: list[bytes], args: argparse.Namespace) -> float:
    return run_load(address, payloads, "unary", args.concurrency, 1, args.seconds)["per_s"]


def phase(name: str, measure) -> dict:
    alone = measure()
    with Busy():
        beside = measure()
    print(f"{name}: {alone:.1f}/s alone, {beside:.1f}/s beside one busy process ({alone / beside:.1f}x slower)",
          file=sys.stderr)
    return {"alone_per_s": alone, "beside_busy_per_s": beside, "slowdown": alone / beside}


def main() -> None:
    args = parse_args()
    report = {"bench": "contention", "host": host_info(), "seconds": args.seconds, "busy": "one single-threaded "
              "Python busy loop", "goal": "slowdown <= ~2x"}
    with tempfile.TemporaryDirectory(prefix="facetwin-contention-") as tmp:
        tmp = Path(tmp)
        size, images = (32, 16) if args.smoke else (64, 500)
        subprocess.run([str(BIN / "facetwin-train"), "synth", str(tmp / "data"), "--images", str(images), "--size",
                        str(size)], check=True, capture_output=True)
        runs = iter(range(100))
        for fixed in (False, True):
            key = "training_fixed_threads" if fixed else "training"
            report[key] = phase(key, lambda: training_rate(tmp / "data", tmp / f"run{next(runs)}", args, fixed))
    try:
        bundle = pick_bundle(args.model_dir, args.model)
    except BundleError as exc:
        report["serving"] = {"skipped": str(exc)}
    else:
        manifest = load_manifest(bundle)
        request = make_request(bundle.name, manifest.identities[-1], manifest.resolution)
        payloads = [pb.SwapStreamRequest(request=request).SerializeToString()]
        proc, address = start_server(args, bundle.parent)
        try:
            report["serving"] = phase("serving", lambda: serving_rate(address, payloads, args))
        finally:
            stop_server(proc)
    write_report(report, args.json_path)


if __name__ == "__main__":
    main()

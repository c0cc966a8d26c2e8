#!/usr/bin/env python3
"""Model-only speed of every available backend on one bundle: faces/s per batch size, batch-1 latency.

`backend.infer` on float32 NCHW faces, nothing else (no gRPC, no image codecs, no batcher). For each backend
that is available on this host (onnxruntime, torch-cpu, torch-cuda fp16 + CUDA graphs, tensorrt fp16):
  throughput  faces/s at batch 1, 8, 32, 128, 512 (a size that runs out of memory is recorded as skipped);
  latency     sequential batch-1 calls: p50 / p99 ms (includes host<->device copies);
  setup_s     construction time (weights load, CUDA-graph capture, TensorRT engine load or build).

    python bench/gpu_backends.py --model-dir out/models --json out/bench_gpu_backends.json
    python bench/gpu_backends.py --model-dir out/models --quick      # CPU smoke run, seconds
    python bench/gpu_backends.py --synthetic original --json out/bench_gpu_backends.json

--synthetic ARCH benchmarks a freshly made bundle of a training preset's model instead (tiny, demo, original: the
64 px deepfakes model, 76 M parameters per swap graph; cpu-128, gpu-128, gpu-256: the residual family), trained
for one step on generated faces: speed does not depend on what the weights learned. It needs the training extra
(torch, onnx, safetensors).

A backend that raises is recorded under "failed" with its error and the next one runs; the JSON is rewritten after
every backend, so a run stopped part-way keeps what it measured.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from facetwin.core.bundle import BundleError, load_manifest, pick_bundle
from facetwin.server.backends import BACKENDS
from facetwin.server.backends.tensorrt_engines import detect_gpu, tensorrt_version

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_json  # noqa: E402  (bench/report.py)

FULL_BATCHES = (1, 8, 32, 128, 512)
# --synthetic: training presets' models (training/config.py PRESET_MODELS; "original" is the full preset's).
SYNTHETIC = ("tiny", "demo", "original", "cpu-128", "gpu-128", "gpu-256")
QUICK_BATCHES = (1, 8)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="out/models", help="folder of bundles (make demo writes out/models)")
    p.add_argument("--model", default=None, help="bundle name (default: the first one)")
    p.add_argument("--synthetic", choices=SYNTHETIC, default=None,
                   help="benchmark a one-step bundle of this architecture, made in a temp dir (ignores --model-dir)")
    p.add_argument("--target", default=None, help="target identity (default: the bundle's first)")
    p.add_argument("--backends", default=None, help="comma-separated backend names (default: all available)")
    p.add_argument("--batch-sizes", default=None, help=f"comma-separated (default {FULL_BATCHES})")
    p.add_argument("--seconds", type=float, default=2.0, help="timed duration per (backend, batch size)")
    p.add_argument("--latency-calls", type=int, default=300, help="sequential batch-1 calls for p50/p99")
    p.add_argument("--quick", action="store_true", help="batches 1 and 8, 0.3 s each, 30 latency calls")
    p.add_argument("--json", dest="json_path", default=None, help="also write the report here")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.latency_calls = 0.3, 30
    default = QUICK_BATCHES if args.quick else FULL_BATCHES
    args.batch_sizes = tuple(int(b) for b in args.batch_sizes.split(",")) if args.batch_sizes else default
    return args


def make_synthetic_bundle(arch: str, root: Path) -> Path:
    """A bundle of architecture `arch` after one training step on two generated identities."""
    from facetwin.training import synth
    from facetwin.training.config import PRESET_MODELS, TrainConfig
    from facetwin.training.export import export_bundle
    from facetwin.training.train import train

    factory = PRESET_MODELS["full" if arch == "original" else arch]
    probe = factory(["a", "b"])
    data = synth.write_dataset(root / "data", identities=2, images=8, size=probe.resolution, seed=0, progress=False)
    names = sorted(p.name for p in data.iterdir() if p.is_dir())
    cfg = TrainConfig.from_preset("tiny", data, root / "run", steps=1, batch_size=2, checkpoint_every=1,
                                  model=factory(names))
    checkpoint = train(cfg, progress=False)
    return export_bundle(checkpoint, root / "models", name=f"synthetic-{arch}")


def is_out_of_memory(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "outofmemory" in text


def throughput(backend: Any, faces: np.ndarray, seconds: float) -> float:
    """Faces/s over at least `seconds` and at least 3 calls, after 2 warm-up calls."""
    for _ in range(2):
        backend.infer(faces)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        backend.infer(faces)
        calls += 1
    return calls * faces.shape[0] / (time.perf_counter() - start)


def latency(backend: Any, face: np.ndarray, calls: int) -> dict[str, float]:
    for _ in range(5):
        backend.infer(face)
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        backend.infer(face)
        samples.append((time.perf_counter() - start) * 1000.0)
    return {"p50_ms": float(np.percentile(samples, 50)), "p99_ms": float(np.percentile(samples, 99)),
            "calls": calls}


def bench_backend(name: str, bundle: Path, target: str, args: argparse.Namespace) -> dict[str, Any]:
    cls = BACKENDS[name]
    manifest = load_manifest(bundle)
    accepted = inspect.signature(cls.__init__).parameters
    options = {"max_batch": max(args.batch_sizes)} if "max_batch" in accepted else {}
    started = time.perf_counter()
    backend = cls(bundle, manifest, target, **options)
    result: dict[str, Any] = {"setup_s": round(time.perf_counter() - started, 3),
                              "precision": getattr(cls, "dtype_name", "float16" if name == "tensorrt" else "float32"),
                              "throughput_faces_per_s": {}, "skipped_batches": {}}
    size = manifest.resolution
    rng = np.random.default_rng(0)
    try:
        for batch in args.batch_sizes:
            faces = rng.random((batch, 3, size, size), dtype=np.float32)
            try:
                result["throughput_faces_per_s"][str(batch)] = round(throughput(backend, faces, args.seconds), 1)
            except Exception as exc:  # OOM is expected at large batches on small cards; anything else is a bug
                if not is_out_of_memory(exc):
                    raise
                result["skipped_batches"][str(batch)] = f"out of memory: {exc}".splitlines()[0]
                break  # larger batches will not fit either
            print(f"  {name:12s} batch {batch:4d}: {result['throughput_faces_per_s'][str(batch)]:10.1f} faces/s",
                  flush=True)
        result["latency_batch1"] = latency(backend, rng.random((1, 3, size, size), dtype=np.float32),
                                           args.latency_calls)
        print(f"  {name:12s} batch-1 latency p50 {result['latency_batch1']['p50_ms']:.3f} ms, "
              f"p99 {result['latency_batch1']['p99_ms']:.3f} ms", flush=True)
    finally:
        backend.close()
    return result


def host_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    gpu = detect_gpu()
    info["gpu"] = {"name": gpu.name, "compute_capability": gpu.compute_capability} if gpu else None
    info["tensorrt"] = tensorrt_version()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
    except ImportError:
        info["torch"] = None
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def main() -> int:
    args = parse_args()
    if args.synthetic:
        with tempfile.TemporaryDirectory(prefix="facetwin-bench-") as tmp:
            return run(args, make_synthetic_bundle(args.synthetic, Path(tmp)))
    try:
        bundle = pick_bundle(args.model_dir, args.model)
    except BundleError as exc:
        sys.exit(f"error: {exc}")
    return run(args, bundle)


def run(args: argparse.Namespace, bundle: Path) -> int:
    """Every requested backend in turn; exit status 1 only when every available one failed."""
    manifest = load_manifest(bundle)
    target = args.target or next(iter(manifest.targets))
    names = args.backends.split(",") if args.backends else list(BACKENDS)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        sys.exit(f"error: unknown backend(s) {unknown}; choose from {sorted(BACKENDS)}")
    report: dict[str, Any] = {
        "bundle": str(bundle), "target": target, "resolution": manifest.resolution,
        "model_config": manifest.model_config, "batch_sizes": list(args.batch_sizes), "seconds": args.seconds,
        "host": host_info(), "backends": {}, "unavailable": {}, "failed": {},
    }
    print(f"bundle {bundle.name} ({manifest.resolution} px), target {target}; host {report['host']}", flush=True)
    for name in names:
        ok, why = BACKENDS[name].available()
        if not ok:
            report["unavailable"][name] = why
            print(f"  {name:12s} skipped: {why}", flush=True)
            continue
        try:
            report["backends"][name] = bench_backend(name, bundle, target, args)
        except Exception as exc:  # one backend failing (a TensorRT build, a CUDA error) must not lose the others
            report["failed"][name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(f"  {name:12s} FAILED: {report['failed'][name]}", flush=True)
            traceback.print_exc()
        write(report, args.json_path)  # after every backend: a run killed later keeps what it measured
    print(json.dumps(report, indent=2))
    return 1 if report["failed"] and not report["backends"] else 0


def write(report: dict[str, Any], json_path: str | None) -> None:
    if json_path:
        write_json(json_path, report)


if __name__ == "__main__":
    sys.exit(main())

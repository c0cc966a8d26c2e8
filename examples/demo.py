"""`make demo`: the whole product once, on the CPU — synth -> train -> export -> serve -> swap through the SDK.

Each step runs the same command a user would type (facetwin-train, facetwin-server) as a subprocess; the swaps
go through the real gRPC server with the client SDK. Writes to --out:
    swap_grid.png     rows: source A | served swap A->B | ground-truth B (and B->A), held-out poses
    swap_clip.mp4     a synthetic clip of A streamed through SwapStream: source | swap, side by side
    demo_report.json  ground-truth scores of the served swaps, the training summary, timings, where everything is
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import cv2
import numpy as np

from facetwin.client import Client
from facetwin.core.files import atomic_write_bytes
from facetwin.training import synth
from facetwin.training.evaluate import compose_grid, ssim

from .common import BIN, banner, finished_training, run, serving, wait_ready


def clip_poses(count: int, seed: int) -> list[synth.Pose]:
    """A smooth head turn with talking and a blink: one held-out pose, animated."""
    base = synth.test_poses(1, seed)[0]
    t = np.linspace(0, 1, count)
    return [dataclasses.replace(base, yaw=float(22 * np.sin(2 * np.pi * x)), pitch=float(8 * np.sin(4 * np.pi * x)),
                                roll=float(6 * np.sin(2 * np.pi * x + 1)), mouth_open=float(0.5 + 0.5 * np.sin(6 * np.pi * x)),
                                blink=1.0 if 0.48 < x < 0.53 else 0.0) for x in t]


def served_swaps(client: Client, args, model: str, known: dict, a: str, b: str, poses) -> dict:
    """Source renders of A, their served swaps to B, and B's ground truth under the same poses."""
    res = args.resolution
    rendered = [synth.render(known[a], pose, res) for pose in poses]
    truth = [synth.render(known[b], pose, res) for pose in poses]
    sources = [image for image, _ in rendered]
    results = list(client.stream(sources, model, b, color="rgb"))
    swapped = [r.image for r in results]
    return {
        "source": sources, "swapped": swapped, "truth": [t for t, _ in truth],
        "ssim": float(np.mean([ssim(s, t) for s, (t, _) in zip(swapped, truth)])),
        "ssim_face": float(np.mean([ssim(s, t, m) for s, (t, m) in zip(swapped, truth)])),
        "l1": float(np.mean([np.abs(s.astype(float) - t) .mean() / 255 for s, (t, _) in zip(swapped, truth)])),
        "server_ms": float(np.mean([r.timings.total_ms for r in results])),
    }


def write_clip(client: Client, model: str, known: dict, a: str, b: str, res: int, path: Path, frames: int) -> int:
    scale = max(1, 256 // res)
    sources = [cv2.cvtColor(synth.render(known[a], pose, res)[0], cv2.COLOR_RGB2BGR) for pose in clip_poses(frames, 7)]
    size = (2 * res * scale, res * scale)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 12, size)
    if not writer.isOpened():
        raise SystemExit(f"error: OpenCV cannot write {path}")
    written = 0
    for source, result in zip(sources, client.stream(sources, model, b, color="bgr")):  # OpenCV frames are BGR
        pair = np.concatenate([source, result.image], axis=1)
        writer.write(cv2.resize(pair, size, interpolation=cv2.INTER_CUBIC))
        written += 1
    writer.release()
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out", help="output folder")
    p.add_argument("--preset", default="demo", choices=["demo", "tiny"], help="tiny = seconds-long smoke run")
    p.add_argument("--images", type=int, default=None, help="images per identity (default 5000, tiny 48)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="training time budget (default 360 s for the demo preset, so make demo stays under 10 minutes "
                        "on a slower machine; 0 = none)")
    p.add_argument("--eval-poses", type=int, default=32, help="held-out poses scored per direction")
    p.add_argument("--clip-frames", type=int, default=72)
    args = p.parse_args(argv)
    tiny = args.preset == "tiny"
    args.resolution = 32 if tiny else 64
    images = args.images or (48 if tiny else 5000)
    out = Path(args.out).resolve()
    data, run_dir, models = out / "data", out / "run", out / "models"
    started, total = time.perf_counter(), 6

    banner(1, total, f"synthetic faces: 2 identities x {images} images at {args.resolution} px")
    run([str(BIN / "facetwin-train"), "synth", str(data), "--identities", "2", "--images", str(images),
         "--size", str(args.resolution)])
    banner(2, total, f"train the {args.preset} autoencoder (shared encoder, one decoder per identity)")
    train_cmd = [str(BIN / "facetwin-train"), "train", "--data", str(data), "--out", str(run_dir), "--preset",
                 args.preset, "--resume"]
    budget = args.max_seconds if args.max_seconds is not None else (0 if tiny else 360)
    run(train_cmd + (["--steps", str(args.steps)] if args.steps else []) + ["--max-seconds", str(budget)])
    trained = finished_training(run_dir)
    banner(3, total, "export the model bundle (ONNX per target + manifest)")
    run([str(BIN / "facetwin-train"), "export", "--checkpoint", trained.checkpoint, "--out", str(models),
         "--name", "demo", "--overwrite"])

    banner(4, total, "start facetwin-server (ONNX Runtime, CPU) on loopback")
    with serving(models) as address:
        with Client(address, timeout=60) as client:
            wait_ready(client, "demo")
            (info,) = [m for m in client.list_models() if m.name == "demo"]
            print(f"serving {info.name}: identities {list(info.identities)}, {info.resolution} px, {info.backend}")
            index = synth.load_index(data)
            known = {entry["name"]: synth.identity_from_dict(entry) for entry in index["identities"]}
            a, b = info.identities[:2]

            banner(5, total, f"swap held-out poses through the SDK: {a}->{b} and {b}->{a}")
            poses = synth.test_poses(args.eval_poses, 1234)
            forward = served_swaps(client, args, "demo", known, a, b, poses)
            backward = served_swaps(client, args, "demo", known, b, a, poses)
            grid_rows = []
            for (x, y), result in (((a, b), forward), ((b, a), backward)):
                grid_rows += [(x, result["source"][:8]), (f"{x}->{y}", result["swapped"][:8]), (f"true {y}", result["truth"][:8])]
            grid_path = out / "swap_grid.png"
            cv2.imwrite(str(grid_path), cv2.cvtColor(compose_grid(grid_rows, scale=3), cv2.COLOR_RGB2BGR))

            banner(6, total, f"stream a {args.clip_frames}-frame clip of {a} as {b} through SwapStream")
            clip_path = out / "swap_clip.mp4"
            frames = write_clip(client, "demo", known, a, b, args.resolution, clip_path, args.clip_frames)

    score = {key: (forward[key] + backward[key]) / 2 for key in ("ssim", "ssim_face", "l1")}
    report = {
        "ground_truth_swap": {**score, "poses_per_direction": len(poses),
                              "per_direction": {f"{a}->{b}": {k: forward[k] for k in ("ssim", "ssim_face", "l1")},
                                                f"{b}->{a}": {k: backward[k] for k in ("ssim", "ssim_face", "l1")}}},
        "server_ms_per_swap": (forward["server_ms"] + backward["server_ms"]) / 2,
        "training": trained.to_dict(),
        "clip_frames": frames,
        "files": {"grid": str(grid_path), "clip": str(clip_path), "bundle": str(models / "demo")},
        "seconds": time.perf_counter() - started,
    }
    atomic_write_bytes(out / "demo_report.json", (json.dumps(report, indent=2) + "\n").encode())
    print(f"\nground-truth swap score (served swaps vs true renders, {len(poses)} held-out poses per direction):")
    print(f"  SSIM {score['ssim']:.3f}   SSIM on the face {score['ssim_face']:.3f}   L1 {score['l1']:.4f}")
    print(f"wrote {grid_path}, {clip_path} ({frames} frames), {out / 'demo_report.json'} "
          f"in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()

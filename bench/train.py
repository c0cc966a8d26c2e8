#!/usr/bin/env python3
"""Training steps/s with the real input pipeline vs with batches already on the device, in one run.

For one data set, preset, variant, device and AMP setting, on one trainer built by step.py's `make_trainer`:
  real_input   the training loop's body (train.py): seed the step's generator, `sample_batches` (sample +
               augment every identity on the training device), `train_step` (forward, losses, backward, optimizer
               steps);
  preloaded    the same number of `train_step` calls on batches made beforehand by `sample_batches` and already
               on the device: pure compute, the ceiling the input pipeline could reach;
  input_only   `sample_batches` alone (no model): step-batches/s of the input pipeline, so a reader sees where
               the time of real_input goes (1/real_input ~ 1/preloaded + 1/input_only).
The input pipeline is real footage's (AugmentConfig.footage: affine + warp) on any data set, the heavier of
the two that training picks by data kind. The three run after warm-up, repeated --repeats times in alternating
order (A B C, C B A, ...) so that drift (thermal, other processes) does not bias one of them; every repetition
is reported. Each measurement is timed between device synchronisations on CUDA (none inside: the CPU runs ahead
as it does in training). Not timed: what the loop does every N steps (progress, TensorBoard, previews,
checkpoints), the same with either input.

The headline `ratio` is the median over repetitions of real_input / preloaded (each from back-to-back runs);
`ratio_pooled` divides the rates pooled over all repetitions. Target: ratio >= 0.85 (the input pipeline slows
training by at most 15 %). On the CPU, `ratio_cpu_time` is the same ratio from this process's CPU seconds: a check
on a host shared with other work, whose load moves wall-clock rates far more than CPU seconds. The report notes the
load average before and after.

    python bench/train.py --json out/bench_train.json                  # demo preset, synthetic faces, auto device
    python bench/train.py --data out/data-real --variant vae-gan --amp bf16 --device cuda --batch-size 64
    python bench/train.py --smoke --preset tiny                        # seconds; what the test runs
"""

from __future__ import annotations

import os

# As facetwin-train does, before torch loads OpenMP: spin-waiting threads crawl when other processes share cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import host_info as base_host_info  # noqa: E402  (bench/report.py)
from report import write_report

from facetwin.core.bundle import VARIANTS  # noqa: E402
from facetwin.training import synth  # noqa: E402
from facetwin.training.amp import AMP_MODES  # noqa: E402
from facetwin.training.config import PRESETS, TrainConfig, preset_model  # noqa: E402
from facetwin.training.data import AugmentConfig, describe, identity_names, load_faces, load_index  # noqa: E402
from facetwin.training.distributed import Distributed, training_device  # noqa: E402
from facetwin.training.step import Trainer, batch_seed, make_trainer, sample_batches, train_step  # noqa: E402

TARGET_RATIO = 0.85
MODES = ("real_input", "preloaded", "input_only")
PRELOADED_POOL = 8  # distinct prepared step-batches the preloaded run cycles through


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="data set folder (synth or extracted faces; default: a synthetic "
                                                "set generated into a temp dir)")
    p.add_argument("--preset", choices=PRESETS, default="demo")
    p.add_argument("--variant", choices=VARIANTS, default="ae")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", nargs="?", const="bf16", default="auto", choices=AMP_MODES,
                   help="mixed precision as in training (default auto; bare --amp: bf16)")
    p.add_argument("--batch-size", type=int, default=None, help="faces per identity per step (default: the preset's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the preset's)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per measurement (default: about --seconds of preloaded steps, calibrated)")
    p.add_argument("--seconds", type=float, default=2.0, help="target length of one measurement when --steps is unset")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps of each kind before measuring")
    p.add_argument("--repeats", type=int, default=8, help="repetitions of the three measurements")
    p.add_argument("--synth-images", type=int, default=64, help="faces per identity of the generated set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long run (tiny generated set, 3 steps, 2 repetitions): checks the bench, not speed")
    p.add_argument("--json", dest="json_path", default=None, help="also write the report here")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.repeats = args.steps or 3, min(args.warmup, 2), min(args.repeats, 2)
        args.synth_images = min(args.synth_images, 8)
    for name in ("warmup", "repeats", "synth_images"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} is too small")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Bench:
    """One trainer and its data on the training device, exactly as train.py sets them up (no resume, one process)."""

    trainer: Trainer
    faces: dict  # identity -> IdentityFaces on the device
    generator: torch.Generator
    preloaded: list  # PRELOADED_POOL step-batches (list[Augmented]) made by sample_batches, on the device
    next_step: int = 0  # step index of the next timed or warm-up step (sets the learning rate and the batch seed)

    def run(self, mode: str, steps: int) -> tuple[float, float]:
        """(wall, process CPU) seconds for `steps` steps of one mode, between device synchronisations."""
        t, cfg, gen = self.trainer, self.trainer.cfg, self.generator
        first = self.next_step
        self.next_step += steps
        sync(t.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        for step in range(first, first + steps):
            gen.manual_seed(batch_seed(cfg, step))  # as train.py's loop: the step's draws come from this generator
            if mode == "real_input":
                train_step(t, sample_batches(t, self.faces, gen), step, gen)
            elif mode == "preloaded":
                train_step(t, self.preloaded[step % len(self.preloaded)], step, gen)
            else:
                sample_batches(t, self.faces, gen)
        sync(t.device)
        return time.perf_counter() - start, time.process_time() - cpu_start


def build(args: argparse.Namespace, data_dir: Path, run_dir: Path) -> tuple[Bench, dict[str, Any]]:
    """train.py's set-up: config from the preset, model for the data set's identities, faces on the device."""
    overrides = {"batch_size": args.batch_size, "threads": args.threads}
    cfg = TrainConfig.from_preset(args.preset, data_dir, run_dir, variant=args.variant, amp=args.amp,
                                  device=args.device, seed=args.seed, tensorboard=False, **overrides)
    torch.set_num_threads(max(1, cfg.threads))
    index = load_index(data_dir)
    names = identity_names(index)
    # Real footage's augmentation whatever the data, plus faceswap's random warp (off in footage(): measured to
    # still the swapped mouth), so the ratio holds for either choice; synthetic faces train without any geometry
    # (AugmentConfig.synthetic), which would time an input pipeline of almost nothing.
    augment = dataclasses.replace(AugmentConfig.footage(), warp=AugmentConfig().warp)
    cfg = dataclasses.replace(cfg, model=preset_model(cfg.preset, names, cfg.variant), augment=augment)
    device = training_device(cfg.device, Distributed())  # cuDNN's autotuning on, as in train.py
    loaded = load_faces(data_dir, resolution=cfg.model.resolution, regions=bool(cfg.loss.eyes_mouth))
    faces = {name: data.to(device) for name, data in loaded.items()}
    trainer = make_trainer(cfg, names, device)
    trainer.model.train()
    generator = torch.Generator()
    pool = []
    for i in range(PRELOADED_POOL):
        generator.manual_seed(batch_seed(cfg, 10**9 + i))  # seeds far from the timed steps'
        pool.append(sample_batches(trainer, faces, generator))
    sync(device)
    info = {"preset": cfg.preset, "variant": cfg.variant, "device": str(device), "amp": cfg.amp,
            "autocast": str(trainer.autocast_dtype).replace("torch.", "") if trainer.autocast_dtype else "float32",
            "batch_size_per_identity": cfg.batch_size, "identities": names, "resolution": cfg.model.resolution,
            "threads": torch.get_num_threads(), "eyes_mouth_maps": bool(cfg.loss.eyes_mouth),
            "augment": dataclasses.asdict(cfg.augment),
            "data": {**describe(index), "dir": str(data_dir),
                     "faces_per_identity": {name: len(data) for name, data in loaded.items()}}}
    return Bench(trainer, faces, generator, pool), info


def measure(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    for mode in MODES:  # warm-up: allocator, cuDNN autotuning, Adam state, first-call overheads
        bench.run(mode, args.warmup)
    steps = args.steps
    if steps is None:  # calibrate on preloaded steps: each measurement lasts about --seconds of pure compute
        probe = max(5, args.warmup)
        rate = probe / bench.run("preloaded", probe)[0]
        steps = max(10, round(args.seconds * rate))
    repetitions = []
    for rep in range(args.repeats):
        order = MODES if rep % 2 == 0 else MODES[::-1]  # A B C, C B A, ...: linear drift cancels
        result: dict[str, Any] = {"order": list(order)}
        for mode in order:
            seconds, cpu_seconds = bench.run(mode, steps)
            result[mode] = {"steps": steps, "seconds": seconds, "cpu_seconds": cpu_seconds, "per_s": steps / seconds}
        result["ratio"] = result["real_input"]["per_s"] / result["preloaded"]["per_s"]
        if bench.trainer.device.type == "cpu":
            result["ratio_cpu_time"] = result["preloaded"]["cpu_seconds"] / result["real_input"]["cpu_seconds"]
        repetitions.append(result)
        print(f"rep {rep + 1}/{args.repeats}: real input {result['real_input']['per_s']:.2f} steps/s, preloaded "
              f"{result['preloaded']['per_s']:.2f} steps/s (ratio {result['ratio']:.3f}), input only "
              f"{result['input_only']['per_s']:.2f} batches/s", file=sys.stderr)
    pooled = {mode: sum(r[mode]["steps"] for r in repetitions) / sum(r[mode]["seconds"] for r in repetitions)
              for mode in MODES}
    ratio = statistics.median(r["ratio"] for r in repetitions)
    cpu_ratio = statistics.median(r.get("ratio_cpu_time", 0.0) for r in repetitions)
    return {
        "steps_per_measurement": steps,
        "warmup_steps": args.warmup,
        "repetitions": repetitions,
        # real_input and preloaded: optimizer steps/s; input_only: step-batches/s (one augmented batch per identity)
        "per_s": pooled,
        "ms_per_step": {mode: 1e3 / rate for mode, rate in pooled.items()}
                       | {"input_overhead": 1e3 / pooled["real_input"] - 1e3 / pooled["preloaded"]},
        "ratio": ratio,
        "ratio_pooled": pooled["real_input"] / pooled["preloaded"],
        "ratio_min": min(r["ratio"] for r in repetitions),
        "ratio_max": max(r["ratio"] for r in repetitions),
        # CPU only, a diagnostic for shared hosts: the same ratio from this process's CPU seconds, which other
        # processes' load barely moves (on CUDA the GPU does the work and this means nothing: null).
        "ratio_cpu_time": cpu_ratio if bench.trainer.device.type == "cpu" else None,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
    }


def host_info(device: torch.device) -> dict[str, Any]:
    info = {**base_host_info(), "torch": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not every platform has it
        return None


def with_data(args: argparse.Namespace, body: Callable[[Path, Path], dict]) -> dict:
    """Runs body(data_dir, run_dir) on --data, or on a synthetic set generated into a temp dir."""
    with tempfile.TemporaryDirectory(prefix="facetwin-bench-train-") as tmp:
        if args.data is not None:
            return body(Path(args.data), Path(tmp) / "run")
        size = preset_model(args.preset, ["a", "b"], args.variant).resolution
        print(f"generating 2 x {args.synth_images} synthetic faces at {size} px ...", file=sys.stderr)
        data = synth.write_dataset(Path(tmp) / "data", identities=2, images=args.synth_images, size=size,
                                   seed=args.seed, progress=False)
        return body(data, Path(tmp) / "run")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = loadavg()

    def body(data_dir: Path, run_dir: Path) -> dict:
        bench, config = build(args, data_dir, run_dir)
        started = time.perf_counter()
        results = measure(bench, args)
        return {"bench": "train", "mode": "smoke" if args.smoke else "full",
                "host": {**host_info(bench.trainer.device), "loadavg_start": load_start, "loadavg_end": loadavg()},
                "config": config, "seconds": round(time.perf_counter() - started, 2), **results}

    try:
        report = with_data(args, body)
    except ValueError as exc:  # bad data set, device without CUDA, variant the preset cannot build, ...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_report(report, args.json_path)
    print(f"real input / preloaded: {report['ratio']:.3f} (median of {len(report['repetitions'])}; pooled "
          f"{report['ratio_pooled']:.3f}), target >= {TARGET_RATIO}: {'met' if report['meets_target'] else 'NOT met'}; "
          f"ms/step: real {report['ms_per_step']['real_input']:.1f}, preloaded "
          f"{report['ms_per_step']['preloaded']:.1f}, input alone {report['ms_per_step']['input_only']:.1f}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

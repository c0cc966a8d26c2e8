"""Trains a face-swap model (core/model.py: ae, vae, vae-gan or cyclegan) on aligned faces.

`train` starts a run, or resumes one from its checkpoint, then loops over steps. Each step seeds its random numbers
from (seed, step, rank), samples and augments one batch per identity and takes one optimizer step (step.py); then,
as configured, rank 0 logs the losses (progress bar, TensorBoard), writes a preview grid (previews.py), a checkpoint
(checkpoint.py) and the training summary (run_folder.py). The loop stops at cfg.steps, or with a checkpoint once
cfg.max_seconds of training are spent; a resume continues towards cfg.steps.

Settings and presets: config.py. Mixed precision: amp.py. Under ``torchrun`` every process trains on its own batches
under DistributedDataParallel and only rank 0 writes: distributed.py. What the run folder holds: run_folder.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from facetwin.core.files import atomic_write_bytes, remove_stale_temporaries
from facetwin.training import amp
from facetwin.training.checkpoint import (
    PER_CALL,
    CheckpointError,
    check_resumable,
    describe_kept_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from facetwin.training.config import PRESETS, TrainConfig, check_config, learning_rate, preset_model
from facetwin.training.cpu_share import CpuShare
from facetwin.training.data import (
    AugmentConfig,
    DatasetError,
    IdentityFaces,
    describe,
    identity_names,
    load_faces,
    load_index,
)
from facetwin.training.distributed import Distributed, all_agree, barrier, process_group, training_device
from facetwin.training.previews import preview_grid, write_preview
from facetwin.training.run_folder import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    STOPPED_AT_INTERRUPT,
    STOPPED_AT_STEPS,
    STOPPED_AT_TIME_BUDGET,
    TrainSummary,
    write_summary,
)
from facetwin.training.step import Trainer, batch_seed, make_trainer, sample_batches, train_step

log = logging.getLogger(__name__)


def train(cfg: TrainConfig, progress: bool = True, resume: bool = False) -> Path:
    """Runs (or resumes) training; returns the path of the final checkpoint. Under torchrun, every process
    calls this; rank 0 writes."""
    check_config(cfg)
    # Recorded absolute: evaluate tells held-out frames from trained ones by it, from any folder.
    cfg = dataclasses.replace(cfg, data_dir=os.path.abspath(cfg.data_dir))
    torch.set_num_threads(max(1, cfg.threads))
    world = Distributed.from_env()
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    index = load_index(cfg.data_dir)
    data_info = describe(index)
    names = identity_names(index)

    if world.is_main:  # a run killed while writing its checkpoint left a temp file; the last good one is intact
        remove_stale_temporaries(ckpt_path)
    start_step, saved = 0, None
    if ckpt_path.exists():
        if not resume:
            raise CheckpointError(f"{ckpt_path} already exists: resume it (--resume) or pick another --out folder")
        saved = load_checkpoint(ckpt_path)
        check_resumable(saved["train_config"], cfg, ckpt_path)
        # A resumed run keeps its own augmentation unless told otherwise, even where the default has changed since.
        cfg = dataclasses.replace(cfg, model=saved["train_config"].model,
                                  augment=cfg.augment or saved["train_config"].augment)
        start_step, saved_data_dir = int(saved["step"]), saved["train_config"].data_dir
        if world.is_main and progress:
            for change in resume_changes(saved["train_config"], cfg):
                print(f"resuming with {change}")
    else:
        if resume and world.is_main and progress:
            print(f"no checkpoint in {out_dir} to resume: starting a new run there")
        if cfg.model is None:
            cfg = dataclasses.replace(cfg, model=preset_model(cfg.preset, names, cfg.variant))
    if cfg.augment is None:
        cfg = dataclasses.replace(cfg, augment=AugmentConfig.for_data(data_info["kind"]))
    assert cfg.model is not None
    if list(cfg.model.identities) != names:
        if saved is None:
            raise CheckpointError(f"the model's identities {list(cfg.model.identities)} differ from the data set's "
                                  f"{names}")
        recorded = os.path.abspath(saved_data_dir)
        what = (f"resume it on the data set it trained on (--data {recorded}, or leave --data out), or pick another "
                "--out folder to train on these" if recorded != cfg.data_dir else
                "the data set has changed since the run began: pick another --out folder to train on it")
        raise CheckpointError(f"the run in {out_dir} trains on {list(cfg.model.identities)}, but {cfg.data_dir} "
                              f"holds {names}: {what}")
    _check_face_size(cfg, data_info, resumed=saved is not None)

    device = training_device(cfg.device, world)
    # uint8 faces live on the training device; augmentation runs there (data.py). Eye/mouth maps only when weighted.
    loaded = load_faces(cfg.data_dir, resolution=cfg.model.resolution, regions=bool(cfg.loss.eyes_mouth),
                        progress=progress and world.is_main)
    faces = {name: data.to(device) for name, data in loaded.items()}
    with process_group(world, device):
        trainer = make_trainer(cfg, names, device, saved, world)
        del saved
        log.info("training on %s in %s", device, amp.describe(trainer.autocast_dtype))
        if world.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out_dir / CONFIG_NAME, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
        if start_step < cfg.steps:
            _loop(trainer, faces, start_step, ckpt_path, data_info, world, progress)
        elif world.is_main:  # nothing left to train: the checkpoint stays as it is, the summary says so
            summary = _summary(trainer, world, ckpt_path, start_step, start_step, 0.0, {}, STOPPED_AT_STEPS)
            write_summary(out_dir, summary)
            if progress:
                print(f"nothing to train: the checkpoint is at step {start_step} of {cfg.steps} (raise --steps to "
                      "train on)")
    return ckpt_path


# The settings facetwin-train train has a flag for, named by it; the others are named by their field.
FLAGS = {name: "--" + name.replace("_", "-") for name in ("preset", "steps", "batch_size", "lr", "lr_final_fraction",
                                                          "grad_clip", "seed", "variant", "amp")} | {"data_dir": "--data"}


def resume_changes(saved: TrainConfig, cfg: TrainConfig) -> list[str]:
    """How `cfg` differs from the run `saved` it resumes, in the settings that shape the training (not the per-call
    ones): "--lr-final-fraction 0.05 (the run used 1.0)", one per setting."""
    ours, theirs = cfg.to_dict(), saved.to_dict()
    theirs["data_dir"] = os.path.abspath(theirs["data_dir"])
    return [f"{FLAGS.get(name, name)} {_setting(ours[name])} (the run used "
            f"{_setting(theirs.get(name))})"
            for name in ours if name not in (*PER_CALL, "out_dir") and ours[name] != theirs.get(name)]


def _setting(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _check_face_size(cfg: TrainConfig, data_info: dict[str, Any], resumed: bool) -> None:
    """DatasetError where the data set's faces are smaller than the model's resolution: upscaled faces teach a model
    blur at the size it will be asked to draw. Larger faces are scaled down, which loses nothing the model could
    use."""
    assert cfg.model is not None
    size, resolution = data_info.get("size"), cfg.model.resolution
    if not isinstance(size, int) or size >= resolution:
        return
    model = f"the run in {cfg.out_dir}" if resumed else f"preset {cfg.preset}"
    again = (f"extract again with --size {resolution}" if data_info["kind"] == "faces"
             else f"render again with facetwin-train synth --size {resolution}")
    sizes = {name: preset_model(name, ["a", "b"]).resolution for name in PRESETS}
    if fitting := [name for name, side in sizes.items() if side == size]:
        again += f", or choose a {size}-px preset ({', '.join(fitting)})"
    elif fitting := [name for name, side in sizes.items() if side < size]:
        again += f", or choose a preset below {size} px ({', '.join(fitting)})"
    raise DatasetError(f"{cfg.data_dir} holds {size} px faces; {model} trains at {resolution} px: {again}")


def _too_big(cfg: TrainConfig, device: torch.device) -> str:
    return (f"a step of {cfg.batch_size} faces per identity does not fit in the memory of {device}: lower "
            "--batch-size")


def _elapsed(started: float, device: torch.device) -> float:
    """Seconds since `started` once the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _loop(t: Trainer, faces: dict[str, IdentityFaces], start_step: int, ckpt_path: Path, data_info: dict[str, Any],
          world: Distributed, progress: bool) -> None:
    """The training loop proper: sample + augment, step, then (rank 0) log, preview, checkpoint and summary."""
    cfg, out_dir = t.cfg, ckpt_path.parent
    writer = _tensorboard(cfg, out_dir, start_step) if world.is_main else None
    generator = torch.Generator()
    t.model.train()
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (progress and world.is_main), desc="train",
               unit="step", dynamic_ncols=True)
    smoothed, losses, stopped, done, first_loss = None, {}, None, start_step, None
    if world.is_main:  # from now on the summary describes this call, even if it is killed before its first checkpoint
        write_summary(out_dir, _summary(t, world, ckpt_path, start_step, start_step, 0.0, losses, None))
    cpu_share = CpuShare(cfg.threads) if t.device.type == "cpu" and cfg.follow_free_cores else None
    started = time.perf_counter()
    with _ctrl_c_finishes_the_step(world) as ctrl_c:
        try:
            for step in range(start_step, cfg.steps):
                if cpu_share is not None and (threads := cpu_share.update()) is not None:
                    torch.set_num_threads(threads)  # another process took (or gave back) a core: see cpu_share.py
                generator.manual_seed(batch_seed(cfg, step, world.rank))
                try:
                    # 1. one augmented batch per identity, on the training device
                    batches = sample_batches(t, faces, generator)
                    # 2-5. forward, losses, backward, optimizer step(s), the weights' moving average
                    terms = train_step(t, batches, step, generator)
                except torch.OutOfMemoryError as exc:
                    raise MemoryError(_too_big(cfg, t.device)) from exc
                except RuntimeError as exc:  # a loss that checks its input's range is the first to see diverged weights
                    if "can't allocate memory" in str(exc):  # the CPU allocator's words
                        raise MemoryError(_too_big(cfg, t.device)) from exc
                    if BCE_OUT_OF_RANGE in str(exc):  # a sigmoid's output is in [0, 1] unless it is NaN
                        raise TrainingDiverged(step, cfg, ckpt_path, "the model's outputs are no longer finite "
                                               "numbers") from exc
                    if _weights_sane(t.model):
                        raise
                    raise TrainingDiverged(step, cfg, ckpt_path, "its weights blew up") from exc

                smoothed = terms["total"] if smoothed is None else 0.95 * smoothed + 0.05 * terms["total"]  # no sync
                bar.update(1)
                done = step + 1
                if world.is_main and (step % cfg.log_every == 0 or done == cfg.steps):
                    losses = {key: float(value) for key, value in terms.items()}  # a device sync, every log_every steps
                    first_loss = _check_loss(losses["total"], first_loss, step, cfg, ckpt_path)
                    bar.set_postfix(loss=f"{float(smoothed):.4f}", lr=f"{learning_rate(cfg, step):.1e}")
                    if writer is not None:
                        for key, value in losses.items():
                            writer.add_scalar(key if key == "grad_norm" else f"loss/{key}", value, done)
                        writer.add_scalar("lr", learning_rate(cfg, step), done)
                if world.is_main and cfg.preview_every and (done % cfg.preview_every == 0 or done == cfg.steps):
                    grid = preview_grid(t.average if t.average is not None else t.model, faces)
                    write_preview(out_dir, done, grid)
                    if writer is not None:
                        writer.add_image("preview", grid, done, dataformats="HWC")
                # Under DDP the ranks agree on the budget every log_every steps only: each agreement is an all-reduce
                # and a device sync, which would stall every step; one process checks its own clock every step.
                out_of_time = bool(cfg.max_seconds) and (world.world_size == 1 or done % cfg.log_every == 0) and \
                    all_agree(time.perf_counter() - started > cfg.max_seconds, world, t.device)
                if ctrl_c.pressed:
                    stopped = STOPPED_AT_INTERRUPT
                    # Flushed at once: the save can take seconds, and a second Ctrl-C meanwhile abandons it.
                    bar.write(f"interrupted: saving the checkpoint at step {done} (Ctrl-C again stops at once, "
                              "keeping the last checkpoint)", file=sys.stderr)
                elif out_of_time or done == cfg.steps:
                    stopped = STOPPED_AT_TIME_BUDGET if out_of_time else STOPPED_AT_STEPS
                if world.is_main and (done % cfg.checkpoint_every == 0 or stopped):
                    # The summary's time runs to the end of this step: earlier checkpoints' writes count, this one's
                    # does not (gigabytes at 128 px, which would make a short run's steps/s read low).
                    seconds = _elapsed(started, t.device)
                    # Before a checkpoint of diverged weights replaces a good one: this step's loss, and whether its
                    # update blew the weights up.
                    first_loss = _check_loss(float(terms["total"]), first_loss, step, cfg, ckpt_path)
                    if not _weights_sane(t.model):
                        raise TrainingDiverged(step, cfg, ckpt_path, "its weights blew up")
                    save_checkpoint(ckpt_path, cfg, t.model, t.optimizer, done, data_info,
                                    {"world_size": world.world_size, **t.checkpoint_extra()},
                                    abandoned=lambda: ctrl_c.at_once)
                    write_summary(out_dir, _summary(t, world, ckpt_path, start_step, done, seconds, losses, stopped))
                if stopped == STOPPED_AT_INTERRUPT:
                    bar.write(f"interrupted at step {done} of {cfg.steps}: checkpoint saved; --resume continues")
                    break
                if out_of_time:
                    if world.is_main:
                        bar.write(f"stopping at step {done} of {cfg.steps}: the {cfg.max_seconds:g} s time budget "
                                  "is spent")
                    break
            elapsed = time.perf_counter() - started
            bar.close()
            if writer is not None:
                writer.close()
            barrier(world)  # every process returns once rank 0's final checkpoint is on disk
        except BaseException:
            bar.close()  # before the error's own words
            if not ctrl_c.at_once:
                raise
            # Wherever the second Ctrl-C landed (inside torch's writer it surfaces as a RuntimeError), the
            # checkpoint on disk is whole: say which one it is. Further Ctrl-Cs are ignored until then.
            raise StoppedAtOnce(ckpt_path) from None
    if progress and world.is_main:
        count = done - start_step
        print(f"trained {count} steps in {elapsed:.1f} s ({count / elapsed:.2f} steps/s, "
              f"{amp.describe(t.autocast_dtype)}), loss {float(smoothed):.4f}; checkpoint {ckpt_path}")
    if stopped == STOPPED_AT_INTERRUPT:
        raise InterruptedWithCheckpoint(f"interrupted at step {done}: checkpoint saved")


class InterruptedWithCheckpoint(KeyboardInterrupt):
    """The first Ctrl-C: the step in flight finished and was saved (the loop has said so)."""


class StoppedAtOnce(KeyboardInterrupt):
    """A Ctrl-C that stopped training without a checkpoint of its own; its message says which checkpoint is kept."""

    def __init__(self, ckpt_path: Path) -> None:
        super().__init__(f"stopped at once: {describe_kept_checkpoint(ckpt_path)}")


class TrainingDiverged(ValueError):
    """The loss exploded or stopped being a number: the weights blew up, mostly for a learning rate too high for the
    model. Raised before a checkpoint of those weights is written."""

    def __init__(self, step: int, cfg: TrainConfig, ckpt_path: Path, reason: str) -> None:
        kept = f"the checkpoint at {ckpt_path} is kept as it was" if ckpt_path.exists() else "no checkpoint was written"
        super().__init__(f"training diverged at step {step + 1} ({reason}): lower --lr (now {cfg.lr:g}) or clip "
                         f"gradients (--grad-clip, now {cfg.grad_clip:g}); {kept}")


# Weights of a healthy run stay within a few units; far beyond, their activations overflow to NaN before any
# weight does, and a loss that checks its input's range (binary cross-entropy) fails first.
SANE_WEIGHT = 1e6
# What torch's binary cross-entropy says when its input holds NaN: the mask head's outputs have diverged.
BCE_OUT_OF_RANGE = "all elements of input should be between 0 and 1"
# How far above its first value in a call a loss may rise. A healthy run's stays within a few per cent of it (every
# variant of the tiny preset over 200 steps, the demo model over 150: at most 1.07x); a diverging one's rises by
# orders of magnitude (tiny at --lr 1: 1e11x within 100 steps, vae at --lr 0.05: 8e5x) while its weights stay
# finite.
EXPLODED = 1000.0


def _check_loss(loss: float, first: float | None, step: int, cfg: TrainConfig, ckpt_path: Path) -> float:
    """TrainingDiverged where `loss` is not a number or has exploded above `first`, the call's first loss (None: this
    is it); returns the first loss."""
    if not math.isfinite(loss):
        raise TrainingDiverged(step, cfg, ckpt_path, "the loss is no longer a finite number")
    if first is None:
        return loss
    if loss > EXPLODED * max(first, 1e-3):
        raise TrainingDiverged(step, cfg, ckpt_path, f"the loss rose from {first:.3g} to {loss:.3g}")
    return first


@torch.no_grad()
def _weights_sane(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) and float(p.abs().max()) < SANE_WEIGHT for p in model.parameters())


class CtrlC:
    """What Ctrl-C has asked of a training loop: `pressed` once it came (finish the step, save, stop); `at_once` once
    it came again (stop now, without the save). Plain flags, set and read on the main thread only: a second Ctrl-C can
    run the handler again inside its first run, so the handler takes no lock (one held there is never released)."""

    def __init__(self) -> None:
        self.pressed = False
        self.at_once = False


@contextlib.contextmanager
def _ctrl_c_finishes_the_step(world: Distributed) -> Any:
    """The first Ctrl-C (SIGINT) sets the yielded CtrlC's `pressed`: the loop finishes its step, saves a checkpoint
    and stops (then KeyboardInterrupt), so an interrupted run loses no step and never stops inside an optimizer step.
    A second one sets `at_once` and raises KeyboardInterrupt wherever the loop is, a checkpoint write included (that
    write is abandoned, the checkpoint before it kept whole); later ones are ignored while the loop says what it
    kept. Under torchrun each rank is signalled on its own and the ranks could stop at different steps, so there
    (and off the main thread) Ctrl-C keeps its default."""
    ctrl_c = CtrlC()
    if world.world_size > 1 or threading.current_thread() is not threading.main_thread():
        yield ctrl_c
        return

    def handle(signum: int, frame: Any) -> None:
        if ctrl_c.at_once:
            return
        if ctrl_c.pressed:
            ctrl_c.at_once = True
            raise KeyboardInterrupt
        ctrl_c.pressed = True

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield ctrl_c
    finally:
        signal.signal(signal.SIGINT, previous)


def _tensorboard(cfg: TrainConfig, out_dir: Path, start_step: int) -> Any:
    """A TensorBoard SummaryWriter into the run folder; None when turned off or not installed."""
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the training extra installs it; a bare torch install may not have it
        log.warning("tensorboard is not installed: no event files (pip install tensorboard; --no-tensorboard "
                    "silences this)")
        return None
    # purge_step: a resumed run hides what the interrupted one logged after its last checkpoint.
    return SummaryWriter(log_dir=str(out_dir), purge_step=start_step or None)


def _summary(t: Trainer, world: Distributed, ckpt_path: Path, start_step: int, step: int, seconds: float,
             losses: dict[str, float], stopped: str | None) -> TrainSummary:
    return TrainSummary(checkpoint=str(ckpt_path) if ckpt_path.exists() else "", variant=t.cfg.variant, precision=amp.describe(t.autocast_dtype),
                        world_size=world.world_size, steps=t.cfg.steps, step_start=start_step, step_end=step,
                        seconds=round(seconds, 3), losses=losses, stopped=stopped)


def dry_run(out_dir: str | Path | None = None, steps: int = 5, progress: bool = False, variant: str = "ae",
            **overrides: Any) -> dict[str, Any]:
    """A few tiny-preset steps on a freshly generated tiny data set; only touches a temp dir unless out_dir is given.
    Keyword arguments override TrainConfig fields (amp, tensorboard, preview_every, ...)."""
    from facetwin.training import synth  # imported lazily: only dry runs need the generator

    with tempfile.TemporaryDirectory(prefix="facetwin-dry-") as tmp:
        data_dir = synth.write_dataset(Path(tmp) / "data", identities=2, images=8, size=32, seed=0, progress=False)
        run_dir = Path(out_dir) if out_dir is not None else Path(tmp) / "run"
        cfg = TrainConfig.from_preset("tiny", data_dir, run_dir, steps=steps, checkpoint_every=steps, variant=variant,
                                      **overrides)
        started = time.perf_counter()
        ckpt = train(cfg, progress=progress)
        seconds = time.perf_counter() - started
        checkpoint = load_checkpoint(ckpt)
        return {"steps": int(checkpoint["step"]), "seconds": round(seconds, 2), "variant": variant,
                "identities": list(checkpoint["train_config"].model.identities),
                "checkpoint": str(ckpt) if out_dir is not None else None}

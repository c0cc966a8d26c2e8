"""Checkpoints: written atomically, read without pickle, and checked before a run resumes from one.

A checkpoint holds ``{config, model, optimizer, step, data}`` and, as a run has them, ``ema`` (the weights' moving
average), ``critics`` and ``critic_optimizer`` (the adversarial variants), ``scaler`` (fp16) and ``world_size``:
enough for export and resume to rebuild everything.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from facetwin.core.files import atomic_write
from facetwin.core.model import CycleGAN, FaceSwapAutoencoder, build_model
from facetwin.training.config import TrainConfig, preset_model
from facetwin.training.run_folder import CHECKPOINT_NAME


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the requested run."""


def save_checkpoint(path: Path, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, data: dict[str, Any], extra: dict[str, Any] | None = None,
                    abandoned: Callable[[], bool] = lambda: False) -> Path:
    """torch.save through files.atomic_write: a crash never leaves half a checkpoint.
    `extra` adds entries (the discriminators' state, the fp16 GradScaler's). When `abandoned()` is true once the
    file is written (a Ctrl-C asked to stop at once while it was), KeyboardInterrupt instead of replacing the
    checkpoint: a write an interrupt cut into is never kept, whatever torch's writer made of the interrupt."""
    payload = {"config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "step": step, "data": data, **(extra or {})}
    try:
        with atomic_write(path) as fh:
            torch.save(payload, fh)
            if abandoned():
                raise KeyboardInterrupt
    except RuntimeError as exc:  # torch reports a failed write (a full disk) as its own error, the OSError behind it
        failure = exc.__cause__ or exc.__context__
        if not isinstance(failure, OSError):
            raise
        kept = " (a checkpoint there from before is left as it was)" if path.exists() else ""
        raise OSError(failure.errno, f"{failure.strerror}{kept}", str(path)) from None
    return path


def check_checkpoint_file(path: Path) -> None:
    """CheckpointError unless `path` is a file, saying what to pass instead where it is a run folder."""
    if path.is_file():
        return
    if (path / CHECKPOINT_NAME).is_file():
        raise CheckpointError(f"{path} is a run folder: pass its checkpoint, {path / CHECKPOINT_NAME}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file (pass the {CHECKPOINT_NAME} that "
                              "facetwin-train train wrote)")
    raise CheckpointError(f"checkpoint {path} does not exist")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a checkpoint without pickle (weights_only=True) and checks its shape; adds "train_config", the
    checkpoint's config as a TrainConfig."""
    path = Path(path)
    check_checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError, EOFError) for bad files
        raise CheckpointError(f"{path} is not a facetwin checkpoint: it is truncated, damaged or another program's "
                              f"file (the pickle-free loader refused it: {type(exc).__name__}); pass the "
                              f"{CHECKPOINT_NAME} that facetwin-train train wrote") from exc
    if not isinstance(checkpoint, dict) or not {"config", "model", "optimizer", "step"} <= set(checkpoint):
        raise CheckpointError(f"{path} is not a facetwin checkpoint (needs config, model, optimizer, step)")
    try:
        checkpoint["train_config"] = TrainConfig.from_dict(checkpoint["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has an unusable config: {exc}") from exc
    if checkpoint["train_config"].model is None:
        raise CheckpointError(f"{path} has no model config")
    return checkpoint


def describe_kept_checkpoint(path: Path) -> str:
    """Which checkpoint a run that stopped abruptly leaves, for its last words: "the checkpoint at P (step N) is kept
    as it was", or that none was written. Reads only the step (the tensors are mapped, not read), so it is quick at
    any size."""
    if not path.is_file():
        return f"no checkpoint was written to {path.parent} (--resume starts afresh)"
    try:
        step = int(_peek(path)["step"])
    except Exception:  # said as far as known: a last message must not fail
        return f"the checkpoint at {path} is kept as it was"
    return f"the checkpoint at {path} (step {step}) is kept as it was; --resume continues from it"


def _peek(path: Path) -> Any:
    """A checkpoint's entries with its tensors mapped, not read: quick at any size."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


# Settings of one call rather than of the run: a resume takes them from its command line or its preset, never from
# the checkpoint (a time budget or a thread count is this machine's and this call's; none of them changes the weights).
PER_CALL = ("max_seconds", "threads", "follow_free_cores", "device", "tensorboard", "log_every", "preview_every")


def resume_config(run_dir: Path, data: Path | None, preset: str | None, **given: Any) -> TrainConfig | None:
    """The settings a resume of the run in `run_dir` trains with: the run's own, as its checkpoint records them, but
    `data`, `preset` and the TrainConfig fields in `given` where they are not None (train() names those that differ
    from the run's); the per-call settings (PER_CALL) come from `given` or the preset. None where the folder holds no
    checkpoint. CheckpointError, saying what to pass, where the recorded data set folder is gone."""
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        recorded = TrainConfig.from_dict(_peek(path)["config"])
    except Exception:  # unreadable: load_checkpoint says why, as a resume would
        load_checkpoint(path)
        raise
    if data is None:
        if not recorded.data_dir:
            raise CheckpointError(f"{path} records no data set folder: pass --data")
        if not Path(recorded.data_dir).is_dir():
            raise CheckpointError(f"the run in {run_dir} trained on {recorded.data_dir}, which is gone: pass --data "
                                  "with the data set to train on")
    preset = preset or recorded.preset
    fresh = TrainConfig.from_preset(preset, data or recorded.data_dir, run_dir, **given)
    settings = {name: getattr(fresh, name) for name in PER_CALL} | \
        {name: value for name, value in given.items() if value is not None}
    cfg = dataclasses.replace(recorded, **settings, data_dir=fresh.data_dir, out_dir=fresh.out_dir, preset=preset)
    if (cfg.preset, cfg.variant) != (recorded.preset, recorded.variant):  # check_resumable says what to do
        cfg = dataclasses.replace(cfg, model=None)
    return cfg


def model_from_checkpoint(checkpoint: dict[str, Any]) -> FaceSwapAutoencoder | CycleGAN:
    """The trained model of a loaded checkpoint, in eval mode: the weights' moving average when the run kept one,
    else the last step's weights."""
    model = build_model(checkpoint["train_config"].model)
    load_weights(model, checkpoint.get("ema", checkpoint["model"]), "weights")
    return model.eval()


def load_weights(module: Any, state: Any, what: str) -> None:
    """module.load_state_dict(state) (a model's or an optimizer's), with CheckpointError naming what does not fit
    instead of torch's error."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        detail = lines[1] if len(lines) > 1 else lines[0]  # torch's first line names only the class
        if len(detail) > 200:
            detail = detail[:200] + "..."
        raise CheckpointError(f"the checkpoint's {what} do not fit its model config ({detail}): it was altered, or "
                              "written by another program") from exc


def check_resumable(saved: TrainConfig, cfg: TrainConfig, path: Path) -> None:
    """Refuses to resume the run `saved` (the checkpoint at `path`) as `cfg` where the two would train different
    models, saying what differs and what to do."""
    assert saved.model is not None
    variant = cfg.model.variant if cfg.model is not None else cfg.variant
    if variant != saved.model.variant:
        raise CheckpointError(f"{path} was trained as variant {saved.model.variant!r}, not {variant!r}: resume it "
                              f"with --variant {saved.model.variant} or use another --out folder")
    if cfg.model is not None and cfg.model != saved.model:
        raise CheckpointError(f"{path} was trained with a different model ({saved.model}); "
                              "use another --out folder or the same preset")
    wanted = preset_model(cfg.preset, saved.model.identities, variant) if cfg.model is None else cfg.model
    if (wanted.resolution, wanted.identities) != (saved.model.resolution, saved.model.identities):
        raise CheckpointError(
            f"{path} was trained at {saved.model.resolution} px on {list(saved.model.identities)} (preset "
            f"{saved.preset}); this run wants {wanted.resolution} px on {list(wanted.identities)} (preset "
            f"{cfg.preset}): resume it with --preset {saved.preset} (or leave --preset out), or pick another --out "
            "folder")
    if wanted != saved.model:
        if saved.preset != cfg.preset:
            raise CheckpointError(f"{path} was trained with preset {saved.preset!r}, not {cfg.preset!r}")
        changed = ", ".join(f"{key} {value!r} -> {getattr(wanted, key)!r}"
                            for key, value in saved.model.to_dict().items() if value != getattr(wanted, key))
        raise CheckpointError(f"{path} was trained with an older model of preset {cfg.preset!r} ({changed}): delete "
                              f"{path.parent} to train the current one, or pick another --out folder")

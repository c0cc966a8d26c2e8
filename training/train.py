"""Trains the shared-encoder / per-identity-decoder autoencoder on aligned faces.

One step, for every identity at once:
  1. sample a batch of that identity's faces, augment (affine + flip + colour on input and target alike,
     random warp on the input only);
  2. encode all inputs with the shared encoder, decode each identity's part with that identity's decoder;
  3. loss = L1 + DSSIM (+ face-weighted L1 + mask BCE) against the un-warped targets, summed over identities;
  4. one Adam step over encoder and all decoders.

A run folder holds ``checkpoint.pt`` (config, model and optimizer state, step) and ``config.json`` (the
effective config, for people). Checkpoints are written atomically and loaded with weights_only=True.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from facetwin.server.bundle import atomic_write_bytes
from facetwin.training.data import AugmentConfig, augment, describe, load_faces, load_index, identity_names
from facetwin.training.losses import LossWeights, reconstruction_loss
from facetwin.training.model import FaceSwapAutoencoder, ModelConfig, ModelConfigError

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
# What each preset changes from the TrainConfig defaults (which are the demo's).
PRESET_OVERRIDES: dict[str, dict[str, Any]] = {
    "demo": {},
    # Seconds, any quality. One thread: the tiny model's ops are too small to split, a second thread only waits.
    "tiny": {"steps": 200, "batch_size": 8, "checkpoint_every": 100, "threads": 1},
}
PRESETS = tuple(PRESET_OVERRIDES)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the requested run."""


@dataclass
class TrainConfig:
    """One training run. The defaults are the CPU demo preset; `from_preset` gives either preset with overrides."""

    data_dir: str  # data set folder (synth layout with index.json)
    out_dir: str  # run folder: checkpoint.pt + config.json
    preset: str = "demo"  # "demo" (CPU demo quality) or "tiny" (tests: seconds); picks the model when model is None
    steps: int = 2400  # total optimizer steps; ~4 min on 2 CPU cores for the demo model (a resume continues to this)
    batch_size: int = 4  # faces per identity per step: at a fixed time budget, more small steps beat fewer big ones
    lr: float = 1e-3  # Adam peak learning rate; faceswap uses 5e-5 over days of GPU time, the demo has minutes
    warmup_steps: int = 50  # linear learning-rate warm-up from ~0 to lr
    # Cosine decay to lr * this by the last step; 1.0 keeps lr constant. Constant swaps better here: a decay
    # sharpens the reconstruction but fits identity-specific detail that does not transfer to the other face.
    lr_final_fraction: float = 1.0
    betas: tuple[float, float] = (0.5, 0.999)  # Adam betas as in faceswap (stable at lr 1e-3 given the warm-up)
    loss: LossWeights = field(default_factory=LossWeights)  # weights of the loss terms
    augment: AugmentConfig = field(default_factory=AugmentConfig.synthetic)  # light: synth data varies pose itself
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)
    seed: int = 0  # seeds initialisation and batch sampling
    threads: int = 2  # torch CPU threads (the demo host has two cores)
    device: str = "auto"  # "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ...
    model: ModelConfig | None = None  # None: the preset's model for the data set's identities

    @classmethod
    def from_preset(cls, preset: str, data_dir: str | Path, out_dir: str | Path, **overrides: Any) -> "TrainConfig":
        """The tuned config of a preset; keyword arguments override single fields (None values are ignored)."""
        if preset not in PRESET_OVERRIDES:
            raise ValueError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
        values = {**PRESET_OVERRIDES[preset], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(data_dir=str(data_dir), out_dir=str(out_dir), preset=preset, **values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = dict(data)
        data["loss"] = LossWeights(**data.get("loss", {}))
        data["augment"] = AugmentConfig(**data.get("augment", {}))
        data["betas"] = tuple(data.get("betas", (0.5, 0.999)))
        if data.get("model") is not None:
            data["model"] = ModelConfig.from_dict(data["model"])
        return cls(**data)


def preset_model(preset: str, identities: list[str] | tuple[str, ...]) -> ModelConfig:
    if preset == "tiny":
        return ModelConfig.tiny(identities)
    if preset == "demo":
        return ModelConfig.demo(identities)
    raise ValueError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a checkpoint without pickle (weights_only=True) and checks its shape."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError, EOFError) for bad files
        raise CheckpointError(f"{path} is not a facetwin checkpoint (refused by the pickle-free loader: "
                              f"{type(exc).__name__})") from exc
    if not isinstance(checkpoint, dict) or not {"config", "model", "optimizer", "step"} <= set(checkpoint):
        raise CheckpointError(f"{path} is not a facetwin checkpoint (needs config, model, optimizer, step)")
    try:
        checkpoint["train_config"] = TrainConfig.from_dict(checkpoint["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has an unusable config: {exc}") from exc
    if checkpoint["train_config"].model is None:
        raise CheckpointError(f"{path} has no model config")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any]) -> FaceSwapAutoencoder:
    """The trained model of a loaded checkpoint, in eval mode."""
    model = FaceSwapAutoencoder(checkpoint["train_config"].model)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not fit its model config: {exc}".splitlines()[0]) from exc
    return model.eval()


def save_checkpoint(path: Path, cfg: TrainConfig, model: FaceSwapAutoencoder, optimizer: torch.optim.Optimizer,
                    step: int, data: dict[str, Any]) -> Path:
    """torch.save to a temp file in the same folder, then os.replace: a crash never leaves half a checkpoint."""
    payload = {"config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "step": step, "data": data}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_resumable(saved: TrainConfig, cfg: TrainConfig, path: Path) -> None:
    if cfg.model is not None and cfg.model != saved.model:
        raise CheckpointError(f"{path} was trained with a different model ({saved.model}); "
                              "use another --out folder or the same preset")
    assert saved.model is not None
    wanted = preset_model(cfg.preset, saved.model.identities) if cfg.model is None else cfg.model
    if (wanted.resolution, wanted.identities) != (saved.model.resolution, saved.model.identities):
        raise CheckpointError(
            f"{path} was trained at {saved.model.resolution} px on {list(saved.model.identities)}; "
            f"this run wants {wanted.resolution} px on {list(wanted.identities)}"
        )
    if wanted != saved.model:
        raise CheckpointError(f"{path} was trained with preset {saved.preset!r}, not {cfg.preset!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device {name!r} is not a torch device (use auto, cpu or cuda)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this torch build sees no CUDA GPU")
    return device


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to lr * lr_final_fraction at the last step.

    The warm-up keeps Adam's first, poorly estimated steps small (a fresh autoencoder can otherwise jump into
    a saturated, all-black-or-white state it never leaves); the decay trades big steps early for detail late.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps - 1, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (cfg.lr_final_fraction + (1 - cfg.lr_final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(cfg: TrainConfig, progress: bool = True, resume: bool = False) -> Path:
    """Runs (or resumes) training; returns the path of the final checkpoint."""
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.checkpoint_every < 1:
        raise ValueError("steps, batch_size and checkpoint_every must be at least 1")
    torch.set_num_threads(max(1, cfg.threads))
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    index = load_index(cfg.data_dir)
    data_info = describe(index)
    names = identity_names(index)

    start_step, saved = 0, None
    if ckpt_path.exists():
        if not resume:
            raise CheckpointError(f"{ckpt_path} already exists: resume it (--resume) or pick another --out folder")
        saved = load_checkpoint(ckpt_path)
        _check_resumable(saved["train_config"], cfg, ckpt_path)
        cfg = dataclasses.replace(cfg, model=saved["train_config"].model)
        start_step = int(saved["step"])
    elif cfg.model is None:
        cfg = dataclasses.replace(cfg, model=preset_model(cfg.preset, names))
    assert cfg.model is not None
    if list(cfg.model.identities) != names:
        raise CheckpointError(f"the model's identities {list(cfg.model.identities)} differ from the data set's {names}")

    device = resolve_device(cfg.device)
    faces = load_faces(cfg.data_dir, resolution=cfg.model.resolution)
    torch.manual_seed(cfg.seed)
    model = FaceSwapAutoencoder(cfg.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    if saved is not None:
        model.load_state_dict(saved["model"])  # optimizer state follows the parameters' device on load
        optimizer.load_state_dict(saved["optimizer"])
    generator = torch.Generator()

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / CONFIG_NAME, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
    if start_step >= cfg.steps:
        return ckpt_path

    model.train()
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not progress, desc="train", unit="step",
               dynamic_ncols=True)
    smoothed = None
    started = time.perf_counter()
    for step in range(start_step, cfg.steps):
        # Batches depend on (seed, step) only: a resumed run trains exactly as an uninterrupted one would.
        generator.manual_seed(cfg.seed * 1_000_003 + step)
        # 1. one augmented batch per identity
        batches = [[t.to(device, non_blocking=True) for t in augment(*faces[name].sample(cfg.batch_size, generator),
                                                                      generator, cfg.augment)] for name in names]
        inputs = torch.cat([inp for inp, _, _ in batches])  # (I*B, 3, R, R), warped
        # 2. the shared encoder sees every identity in one pass; each decoder gets its own identity's part
        features = model.encoder(inputs).split(cfg.batch_size)
        total = torch.zeros((), device=device)
        for name, feats, (_, target, target_mask) in zip(names, features, batches):
            face, mask = model.decoders[name](feats)
            # 3. reconstruct the un-warped target
            loss, _terms = reconstruction_loss(face, target, mask, target_mask, cfg.loss)
            total = total + loss
        # 4. one Adam step over the encoder and every decoder
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

        value = float(total.detach()) / len(names)
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        bar.update(1)
        if step % 10 == 0 or step + 1 == cfg.steps:
            bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{learning_rate(cfg, step):.1e}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(ckpt_path, cfg, model, optimizer, step + 1, data_info)
    bar.close()
    elapsed = time.perf_counter() - started
    if progress:
        done = cfg.steps - start_step
        print(f"trained {done} steps in {elapsed:.1f} s ({done / elapsed:.2f} steps/s), loss {smoothed:.4f}; "
              f"checkpoint {ckpt_path}")
    return ckpt_path


def dry_run(out_dir: str | Path | None = None, steps: int = 5, progress: bool = False) -> dict[str, Any]:
    """A few tiny-preset steps on a freshly generated tiny data set; only touches a temp dir unless out_dir is given."""
    from facetwin.training import synth  # imported lazily: only dry runs need the generator

    with tempfile.TemporaryDirectory(prefix="facetwin-dry-") as tmp:
        data_dir = synth.write_dataset(Path(tmp) / "data", identities=2, images=8, size=32, seed=0, progress=False)
        run_dir = Path(out_dir) if out_dir is not None else Path(tmp) / "run"
        cfg = TrainConfig.from_preset("tiny", data_dir, run_dir, steps=steps, checkpoint_every=steps)
        started = time.perf_counter()
        ckpt = train(cfg, progress=progress)
        seconds = time.perf_counter() - started
        checkpoint = load_checkpoint(ckpt)
        return {"steps": int(checkpoint["step"]), "seconds": round(seconds, 2),
                "identities": list(checkpoint["train_config"].model.identities),
                "checkpoint": str(ckpt) if out_dir is not None else None}

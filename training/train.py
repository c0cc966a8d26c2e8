"""Trains a face-swap model (model.py: ae, vae, vae-gan or cyclegan) on aligned faces.

One step (``train_step``), for every identity at once:
  1. sample a batch of that identity's faces, augment on the training device (affine + flip + colour on input
     and target alike; the random warp, where configured, on the input only);
  2. ae / vae / vae-gan: encode all inputs with the shared encoder (vae: sample z = mu + sigma * eps), decode
     each identity's part with that identity's decoder. cyclegan: every generator pass of the cycle;
  3. loss = L1 + DSSIM (+ face-weighted L1, eye/mouth L1, mask BCE) against the un-warped targets, summed over
     identities; + the gap between the identities' latent code statistics (ae, vae, vae-gan); + KL (vae,
     vae-gan); + cycle consistency and translated-mask terms (cyclegan); + the least-squares GAN term against
     each identity's discriminator (vae-gan, cyclegan);
  4. one Adam step over the generator(s); then, for the adversarial variants, one Adam step of the
     discriminators on real vs (mixed-up) generated faces;
  5. the exponential moving average of the generator's weights takes a small step towards them: checkpoints keep
     both, and export, evaluation and previews use the average (smoother than any single step's weights).

Mixed precision (``amp``): bf16 autocast, or fp16 autocast with a GradScaler (meant for CUDA; on a CPU it runs,
slowly, so the recipe can be checked without a GPU); ``auto`` (the default) picks bf16 wherever the hardware
computes it natively -- CUDA GPUs with bf16, and CPUs with AVX512-BF16 or AMX, where it runs a step ~1.3x faster --
and float32 elsewhere and for the adversarial variants (FLOAT32_UNDER_AUTO). Started by ``torchrun``, every process
trains on its own batches (batch_size is per process) under DistributedDataParallel, and only rank 0 writes:
checkpoints, config.json, TensorBoard events and preview grids.

A run folder holds ``checkpoint.pt`` (config, model and optimizer state, step, the weights' moving average;
discriminators and their optimizer for the adversarial variants), ``config.json`` (the effective config, for
people), TensorBoard event files and ``previews/step_<N>.png`` (rows: faces of A, A -> A, A -> B, ... per
identity). Checkpoints are written atomically and loaded with weights_only=True.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from facetwin.core.files import atomic_write, atomic_write_bytes
from facetwin.core.model import (
    VARIANTS,
    CycleGAN,
    Discriminators,
    FaceSwapAutoencoder,
    ModelConfig,
    build_discriminators,
    build_model,
)
from facetwin.training.data import (
    AugmentConfig,
    Augmented,
    IdentityFaces,
    augment,
    describe,
    identity_names,
    load_faces,
    load_index,
    to_device,
)
from facetwin.training.losses import (
    LossWeights,
    cycle_consistency_loss,
    kl_divergence,
    latent_moment_gap,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    mask_loss,
    mixup_discriminator_loss,
    reconstruction_loss,
)

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
# What each preset changes from the TrainConfig defaults (which are the demo's).
PRESET_OVERRIDES: dict[str, dict[str, Any]] = {
    "demo": {},
    # Seconds, any quality. One thread: the tiny model's ops are too small to split, a second thread only waits.
    # float32: tests give the same numbers on every host, with or without bf16 hardware.
    "tiny": {"steps": 200, "batch_size": 8, "checkpoint_every": 100, "threads": 1, "amp": "off"},
    # A GPU host: the 2017 deepfakes model (ModelConfig.original, 82 M parameters) at 4x the demo's batch. Its
    # 1,024-wide code diverged at the demo's lr 1e-3 (the latent-matching term reached 2e4 by step 61 on the CPU);
    # at 2e-4 it trained steadily through the 1,800 steps a CPU could afford; after 1,200 it already rebuilt held-out
    # faces better than the demo model does after 6,000 (face SSIM 0.755 vs 0.741; README "Measured").
    # Its gradient norm (median 1.39, 99th percentile 2.4 over its first 319 steps on a CPU) clips at ~3x its
    # median, as the demo's (median 0.8) does at 2.
    "full": {"steps": 100_000, "batch_size": 16, "lr": 2e-4, "checkpoint_every": 2000, "grad_clip": 4.0},
}
PRESETS = tuple(PRESET_OVERRIDES)
AMP_MODES = ("auto", "off", "bf16", "fp16")
PREVIEW_DIR = "previews"  # preview grids go to <run>/previews/step_<N>.png
PREVIEW_FACES = 6  # columns of a preview grid
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the requested run."""


@dataclass
class TrainConfig:
    """One training run. The defaults are the CPU demo preset; `from_preset` gives any preset with overrides."""

    data_dir: str  # data set folder (synth layout with index.json)
    out_dir: str  # run folder: checkpoint.pt + config.json
    # "demo" (CPU demo quality), "tiny" (tests: seconds) or "full" (GPU hosts); picks the model when model is None
    preset: str = "demo"
    # Total optimizer steps (a resume continues to this): the demo model's 6,000 took 334 s on 2 idle cores in bf16.
    steps: int = 6000
    # Stop early once training has run this long (0: no limit), with a checkpoint at the stop; --resume continues
    # towards `steps`. The demo sets it so `make demo` keeps its 10-minute promise on a slower machine.
    max_seconds: float = 0.0
    batch_size: int = 4  # faces per identity per step: at a fixed time budget, more small steps beat fewer big ones
    lr: float = 1e-3  # Adam peak learning rate; faceswap uses 5e-5 over days of GPU time, the demo has minutes
    warmup_steps: int = 50  # linear learning-rate warm-up from ~0 to lr
    # Cosine decay to lr * this by the last step; 1.0 keeps lr constant. Constant swaps better in the demo's 6,000
    # steps (0.827 vs 0.817 decaying to 0.05 over 7,000), but long runs need the decay: the demo resumed to 30,000
    # steps decaying to 0.05 swapped at 0.893, at a constant lr it fell apart (7,141 -> 28,325 steps: 0.827 -> 0.497).
    lr_final_fraction: float = 1.0
    # Largest L2 norm of the generator's whole gradient; a step's larger gradient is scaled down to it (0: no limit).
    # With Adam's beta1 0.5 one gradient 25x the usual moves every weight ~15x further than usual: in the demo
    # (median norm 0.8) such a step at 5,330 set off a runaway in which latent_match reached 28,000 and the swap
    # was ruined (face SSIM 0.05); clipped at 2 the same run trained through (0.801). TensorBoard: grad_norm.
    grad_clip: float = 2.0
    betas: tuple[float, float] = (0.5, 0.999)  # Adam betas as in faceswap (stable at lr 1e-3 given the warm-up)
    loss: LossWeights = field(default_factory=LossWeights)  # weights of the loss terms
    # None: AugmentConfig.for_data(the data set's kind): none for synthetic faces, a light affine for real ones
    augment: AugmentConfig | None = None
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)
    seed: int = 0  # seeds initialisation and batch sampling
    threads: int = 2  # torch CPU threads (the demo host has two cores)
    device: str = "auto"  # "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ...
    model: ModelConfig | None = None  # None: the preset's model for the data set's identities
    variant: str = "ae"  # "ae", "vae", "vae-gan" or "cyclegan" (model.py); must match model.variant if model is set
    # Mixed precision: "auto" (bf16 where the device has it natively, else off), "off", "bf16" (autocast) or "fp16"
    # (autocast + GradScaler; for CUDA: it runs on a CPU, many times slower). The demo host has AVX512-BF16: 6,048
    # steps in its 360 s, 4,087 in float32.
    amp: str = "auto"
    # Decay of the weights' exponential moving average, which is what gets exported (0: export the last step's
    # weights). Early steps use min(decay, (1 + step) / (10 + step)) so short runs average a short window. On the
    # demo (360 s) the average swapped at SSIM 0.830 against 0.806 for the last step's weights.
    ema_decay: float = 0.999
    tensorboard: bool = True  # loss scalars as TensorBoard event files in out_dir (tensorboard --logdir <runs>)
    log_every: int = 10  # steps between TensorBoard scalars and progress-bar loss updates
    preview_every: int = 0  # steps between PNG preview grids in out_dir/previews (0: none)

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
        data["augment"] = AugmentConfig(**data["augment"]) if data.get("augment") is not None else None
        data["betas"] = tuple(data.get("betas", (0.5, 0.999)))
        if data.get("model") is not None:
            data["model"] = ModelConfig.from_dict(data["model"])
        return cls(**data)


def preset_model(preset: str, identities: list[str] | tuple[str, ...], variant: str = "ae") -> ModelConfig:
    if preset == "tiny":
        config = ModelConfig.tiny(identities)
    elif preset == "demo":
        config = ModelConfig.demo(identities)
    elif preset == "full":
        config = ModelConfig.original(identities)
    else:
        raise ValueError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
    if variant == config.variant:
        return config
    shared = 0 if variant == "cyclegan" else config.shared_upscales  # cyclegan's generators share nothing
    return dataclasses.replace(config, variant=variant, shared_upscales=shared)  # re-validates


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


def model_from_checkpoint(checkpoint: dict[str, Any]) -> FaceSwapAutoencoder | CycleGAN:
    """The trained model of a loaded checkpoint, in eval mode: the weights' moving average when the run kept one
    (step 5 of the module docstring), else the last step's weights."""
    model = build_model(checkpoint["train_config"].model)
    try:
        model.load_state_dict(checkpoint.get("ema", checkpoint["model"]))
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not fit its model config: {exc}".splitlines()[0]) from exc
    return model.eval()


def save_checkpoint(path: Path, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, data: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """torch.save through files.atomic_write: a crash never leaves half a checkpoint.
    `extra` adds entries (the discriminators' state, the fp16 GradScaler's)."""
    payload = {"config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "step": step, "data": data, **(extra or {})}
    with atomic_write(path) as fh:
        torch.save(payload, fh)
    return path


def _check_resumable(saved: TrainConfig, cfg: TrainConfig, path: Path) -> None:
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
            f"{path} was trained at {saved.model.resolution} px on {list(saved.model.identities)}; "
            f"this run wants {wanted.resolution} px on {list(wanted.identities)}"
        )
    if wanted != saved.model:
        if saved.preset != cfg.preset:
            raise CheckpointError(f"{path} was trained with preset {saved.preset!r}, not {cfg.preset!r}")
        changed = ", ".join(f"{key} {value!r} -> {getattr(wanted, key)!r}"
                            for key, value in saved.model.to_dict().items() if value != getattr(wanted, key))
        raise CheckpointError(f"{path} was trained with an older model of preset {cfg.preset!r} ({changed}): delete "
                              f"{path.parent} to train the current one, or pick another --out folder")


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


def _check_config(cfg: TrainConfig) -> None:
    """Settings that are wrong whatever the data: fail before anything is read or written."""
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.checkpoint_every < 1 or cfg.log_every < 1:
        raise ValueError("steps, batch_size, checkpoint_every and log_every must be at least 1")
    if cfg.preview_every < 0:
        raise ValueError(f"preview_every must be 0 (off) or a number of steps, got {cfg.preview_every}")
    if cfg.max_seconds < 0:
        raise ValueError(f"max_seconds must be 0 (no limit) or a number of seconds, got {cfg.max_seconds}")
    if cfg.variant not in VARIANTS:
        raise ValueError(f"variant {cfg.variant!r} is not one of {', '.join(VARIANTS)}")
    if cfg.model is not None and cfg.model.variant != cfg.variant:
        raise ValueError(f"the model config is variant {cfg.model.variant!r} but the run asks for {cfg.variant!r}")
    if cfg.amp not in AMP_MODES:
        raise ValueError(f"amp {cfg.amp!r} is not one of {', '.join(AMP_MODES)}")
    if not cfg.grad_clip >= 0.0:  # also refuses NaN
        raise ValueError(f"grad_clip must be 0 (no clipping) or a positive gradient norm, got {cfg.grad_clip}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) (0: no moving average), got {cfg.ema_decay}")


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a torchrun job (one process, rank 0 of 1, without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Distributed":
        """torchrun's environment: RANK, WORLD_SIZE, LOCAL_RANK (MASTER_ADDR/PORT are read by init_process_group)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere torch emulates it, slower than
    float32."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


# `amp auto` keeps these in float32: a bf16 vae-gan run on the CPU diverged twice (its log-variance spiked past the
# float range at step 2,973, then, clamped, its loss ran to 1e5), while ae and vae trained cleanly in bf16.
# cyclegan, also adversarial, has not been tried in bf16. `--amp bf16` still runs them in bf16 when asked.
FLOAT32_UNDER_AUTO = ("vae-gan", "cyclegan")


def _cuda_has_bf16(device: torch.device) -> bool:
    """Whether this GPU computes bfloat16 in hardware (Ampere and later). torch.cuda.is_bf16_supported() alone also
    says yes where bf16 is only emulated (V100, T4: slower than float32), and asks the current device, not this one."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def _autocast_dtype(amp: str, device: torch.device, variant: str = "ae") -> torch.dtype | None:
    """The autocast dtype of an amp setting on this device for this variant; None = full float32."""
    if amp == "off":
        return None
    if amp == "auto":
        if variant in FLOAT32_UNDER_AUTO:
            return None
        if device.type == "cuda":
            return torch.bfloat16 if _cuda_has_bf16(device) else None
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None
    if device.type == "cpu":
        if amp == "fp16":  # runs (with its GradScaler) so the CUDA recipe can be checked anywhere; slow everywhere
            log.warning("amp=fp16 on a CPU: torch's fp16 kernels there are many times slower than bf16 or off; "
                        "use it to check the fp16 path, not to train")
            return torch.float16
        if not cpu_has_bf16():
            log.warning("amp=bf16 on a CPU without AVX512-BF16 or AMX: torch emulates it, expect it slower than off")
        return torch.bfloat16
    if device.type != "cuda":
        log.warning("amp=%s ignored: mixed precision runs on CUDA and CPUs, this run is on %s (float32)", amp, device)
        return None
    if amp == "bf16" and not _cuda_has_bf16(device):
        raise ValueError(f"amp=bf16 asked for, but {torch.cuda.get_device_name(device)} has no bfloat16 in hardware; use fp16")
    return torch.bfloat16 if amp == "bf16" else torch.float16


@dataclass
class Trainer:
    """Everything a step needs (built by `make_trainer`, used by `train_step`)."""

    cfg: TrainConfig
    names: list[str]  # identities, in the data set's (and the batches') order
    device: torch.device
    model: FaceSwapAutoencoder | CycleGAN  # the generator(s), unwrapped: checkpoints, previews, scoring
    forward: nn.Module  # the model's training_forward, behind DistributedDataParallel when distributed
    optimizer: torch.optim.Optimizer
    critics: Discriminators | None = None  # unwrapped; the generator's adversarial term scores with these
    critics_forward: nn.Module | None = None  # the critics' own step goes through this (DDP when distributed)
    critic_optimizer: torch.optim.Optimizer | None = None
    autocast_dtype: torch.dtype | None = None  # None: float32
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))
    average: nn.Module | None = None  # the generator's weights' moving average (cfg.ema_decay); None when off

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


class _TrainingForward(nn.Module):
    """What DDP wraps: a step's whole generator pass is one forward call, so DDP all-reduces every gradient once."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> dict[str, torch.Tensor]:
        return self.model.training_forward(*args)


def make_trainer(cfg: TrainConfig, names: list[str], device: torch.device, saved: dict[str, Any] | None = None,
                 world: Distributed = Distributed()) -> Trainer:
    """Builds the model (+ discriminators), optimizers and scaler of a run on `device`, restoring `saved`."""
    assert cfg.model is not None
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run of a seed
    model = build_model(cfg.model).to(device)
    fused = device.type in ("cpu", "cuda")  # one kernel per step for all parameters: ~10 % of a CPU demo step
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, fused=fused)
    critics = build_discriminators(cfg.model)
    critic_optimizer = None
    if critics is not None:
        critics = critics.to(device)
        critic_optimizer = torch.optim.Adam(critics.parameters(), lr=cfg.lr, betas=cfg.betas, fused=fused)
    autocast_dtype = _autocast_dtype(cfg.amp, device, cfg.variant)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)  # fp16 gradients underflow
    if saved is not None:
        model.load_state_dict(saved["model"])  # optimizer state follows the parameters' device on load
        optimizer.load_state_dict(saved["optimizer"])
        if critics is not None and critic_optimizer is not None:
            if "critics" not in saved or "critic_optimizer" not in saved:
                raise CheckpointError(f"the checkpoint of this {cfg.model.variant} run lacks its discriminators")
            critics.load_state_dict(saved["critics"])
            critic_optimizer.load_state_dict(saved["critic_optimizer"])
        if scaler.is_enabled() and "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
    average = None
    if cfg.ema_decay:  # a run resumed without one starts averaging from its current weights
        average = copy.deepcopy(model).requires_grad_(False)
        if saved is not None and "ema" in saved:
            average.load_state_dict(saved["ema"])
    forward: nn.Module = _TrainingForward(model)
    critics_forward: nn.Module | None = critics
    if world.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        forward = DistributedDataParallel(forward, device_ids=ids)
        if critics is not None:
            critics_forward = DistributedDataParallel(critics, device_ids=ids)
    log.info("training on %s in %s", device, "float32" if autocast_dtype is None else f"{autocast_dtype} autocast")
    return Trainer(cfg, names, device, model, forward, optimizer, critics, critics_forward, critic_optimizer,
                   autocast_dtype, scaler, average)


def train_step(t: Trainer, batches: list[Augmented], step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One optimizer step of the generator(s) (and of the discriminators) on one augmented batch per identity.

    `generator` (CPU) supplies the step's remaining random numbers (VAE noise, mixup weights), so a seeded step is
    reproducible on any device. Returns the loss terms, averaged over identities, as detached 0-d tensors
    ("total" is the generator's objective) and "grad_norm", the generator's gradient norm before clipping: no device
    sync happens here.
    """
    for optimizer in (t.optimizer, t.critic_optimizer):
        for group in optimizer.param_groups if optimizer is not None else ():
            group["lr"] = learning_rate(t.cfg, step)
    if isinstance(t.model, CycleGAN):
        total, terms, reals, fakes = _cyclegan_losses(t, batches)
    else:
        total, terms, reals, fakes = _autoencoder_losses(t, batches, generator)
    if t.critics is not None:  # the generator's adversarial term: fool each identity's critic
        adversarial = _generator_adversarial_loss(t, fakes)
        total = total + t.cfg.loss.gan * adversarial
        terms["gan"] = adversarial.detach()
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(total).backward()
    t.scaler.unscale_(t.optimizer)  # the true gradients (a no-op without fp16's scaler), then the norm before clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.cfg.grad_clip or math.inf)
    t.scaler.step(t.optimizer)
    if t.critics is not None:
        terms["critic"] = _critic_step(t, reals, fakes.detach(), generator)
    t.scaler.update()  # once per step, after every optimizer (torch.amp's multi-optimizer recipe)
    if t.average is not None:
        update_average(t.average, t.model, t.cfg.ema_decay, step)
    terms["total"] = total.detach()
    return {key: value / len(batches) for key, value in terms.items()} | {"grad_norm": grad_norm.detach()}


@torch.no_grad()
def update_average(average: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """Step 5: average += (1 - d) * (weights - average) with d = min(decay, (1 + step) / (10 + step)), so early on,
    when the weights move fast, the average follows them closely. Buffers (none in model.py today) are copied."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(average.parameters()), list(model.parameters()), 1.0 - d)
    for mine, theirs in zip(average.buffers(), model.buffers()):
        mine.copy_(theirs)


def _add_terms(terms: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
    for key, value in new.items():
        terms[key] = terms[key] + value if key in terms else value


def _autoencoder_losses(t: Trainer, batches: list[Augmented], generator: torch.Generator):
    """ae / vae / vae-gan: reconstruction of every identity by its own decoder (+ KL)."""
    assert isinstance(t.model, FaceSwapAutoencoder)
    inputs = torch.cat([batch.inputs for batch in batches])  # (I*B, 3, R, R), warped
    noise = None
    if t.model.config.variational:  # eps ~ N(0, I) of the reparameterisation, drawn on the CPU like all randomness
        noise = to_device(torch.randn(inputs.shape[0], t.model.config.latent, generator=generator), t.device)
    with t.autocast():
        out = t.forward(inputs, noise)  # the shared encoder sees every identity in one pass
    faces, masks = out["face"].float().chunk(len(batches)), out["mask"].float().chunk(len(batches))
    total = torch.zeros((), device=t.device)
    terms: dict[str, torch.Tensor] = {}
    for face, mask, batch in zip(faces, masks, batches):  # each decoder against its identity's un-warped target
        loss, parts = reconstruction_loss(face, batch.target, mask, batch.target_mask, t.cfg.loss,
                                          batch.target_regions)
        total = total + loss
        _add_terms(terms, parts)
    if t.cfg.loss.latent_match and len(batches) > 1:  # B's decoder must meet A's codes as codes it knows
        gap = latent_moment_gap(out["mu"].float().chunk(len(batches)))
        total = total + t.cfg.loss.latent_match * gap
        terms["latent_match"] = gap.detach()
    if "logvar" in out:
        kl = kl_divergence(out["mu"].float(), out["logvar"].float())  # per face, over all identities' faces
        total = total + t.cfg.loss.kl * kl * len(batches)  # summed over identities like the other terms
        terms["kl"] = kl.detach() * len(batches)
    return total, terms, torch.cat([batch.target for batch in batches]), out["face"]


def _cyclegan_losses(t: Trainer, batches: list[Augmented]):
    """cyclegan: identity (as reconstruction), translated masks, cycle consistency; the critics judge translations."""
    weights = t.cfg.loss
    reals = torch.cat([batch.target for batch in batches])  # (2B, 3, R, R), row blocks: A, B
    with t.autocast():
        out = t.forward(torch.cat([batch.inputs for batch in batches]), reals)
    same, same_mask, fake_mask, cycled = (out[key].float().chunk(2) for key in ("same", "same_mask", "fake_mask",
                                                                                 "cycled"))
    total = torch.zeros((), device=t.device)
    terms: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        other = batches[1 - i]
        loss, parts = reconstruction_loss(same[i], batch.target, same_mask[i], batch.target_mask, weights,
                                          batch.target_regions)
        translated_mask = mask_loss(fake_mask[i], other.target_mask, weights.mask_kind)  # a swap keeps the face's place
        cycle = cycle_consistency_loss(cycled[i], batch.target)
        total = total + weights.identity * loss + weights.mask * translated_mask + weights.cycle * cycle
        _add_terms(terms, {**parts, "fake_mask": translated_mask.detach(), "cycle": cycle.detach()})
    return total, terms, reals, out["fake"]


def _generator_adversarial_loss(t: Trainer, fakes: torch.Tensor) -> torch.Tensor:
    """LSGAN generator term, summed over identities; the critics are frozen for this pass (no weight gradients)."""
    assert t.critics is not None
    t.critics.requires_grad_(False)
    with t.autocast():
        scores = t.critics(fakes)  # unwrapped: DDP must not expect gradients of the critics here
    t.critics.requires_grad_(True)  # autograd recorded the pass without them; the critics' step needs them back
    return sum(lsgan_generator_loss(part) for part in scores.float().chunk(len(t.names)))


def _critic_step(t: Trainer, reals: torch.Tensor, fakes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One Adam step of every identity's critic: real faces vs the generator's, optionally mixed up."""
    assert t.critics_forward is not None and t.critic_optimizer is not None
    alpha, count = t.cfg.loss.mixup_alpha, len(t.names)
    if alpha > 0:  # faceswap-GAN's mixup: score lam * real + (1 - lam) * fake, regress to lam
        seed = int(torch.randint(2**62, (1,), generator=generator))
        lam = to_device(torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, reals.shape[0])).float(),
                        t.device)
        mixed = lam.view(-1, 1, 1, 1) * reals + (1 - lam.view(-1, 1, 1, 1)) * fakes.float()
        with t.autocast():
            scores = t.critics_forward(mixed)
        loss = sum(mixup_discriminator_loss(part, weight)
                   for part, weight in zip(scores.float().chunk(count), lam.chunk(count)))
    else:
        pairs = torch.cat([torch.cat([real, fake.float()]) for real, fake in zip(reals.chunk(count),
                                                                                 fakes.chunk(count))])
        with t.autocast():
            scores = t.critics_forward(pairs)  # identity i's rows: its real faces, then its fakes
        loss = sum(lsgan_discriminator_loss(*part.chunk(2)) for part in scores.float().chunk(count))
    t.critic_optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    t.scaler.step(t.critic_optimizer)
    return loss.detach()


def preview_grid(model: nn.Module, faces: dict[str, IdentityFaces], count: int = PREVIEW_FACES) -> np.ndarray:
    """uint8 RGB grid (H, W, 3): per source identity X, rows X, X -> X, X -> Y for every other Y; columns: X's
    first `count` faces (fixed, un-augmented, so grids of successive steps compare)."""
    was_training = model.training
    model.eval()
    rows = []
    with torch.no_grad():
        for source, data in faces.items():
            x = data.faces[:count].float() / 255.0  # (n, 3, R, R)
            rows.append(x)
            rows.extend(model(x, target)[0].float() for target in [source, *(n for n in faces if n != source)])
    model.train(was_training)
    side = rows[0].shape[-1]
    strips = [torch.cat([*row, *[torch.zeros(3, side, side, device=row.device)] * (count - len(row))], dim=2)
              for row in rows]  # each (3, R, count*R); short identities padded black
    grid = torch.cat(strips, dim=1)  # (3, rows*R, count*R)
    return (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def _write_png(path: Path, rgb: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("cv2.imencode failed to encode a PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data.tobytes())


def batch_seed(cfg: TrainConfig, step: int, rank: int = 0) -> int:
    """Batches depend on (seed, step, rank) only: a resumed run trains exactly as an uninterrupted one would,
    and every torchrun process draws its own batches (rank 0's are the single-process run's). The CPU generator
    keeps only the seed's low 32 bits, so ranks are spread by an odd 32-bit constant (2^32 / golden ratio)."""
    return cfg.seed * 1_000_003 + step + rank * 0x9E3779B9


def sample_batches(t: Trainer, faces: dict[str, IdentityFaces], generator: torch.Generator) -> list[Augmented]:
    """Step 1: one augmented batch per identity, on the faces' (the training) device. Sample, then augment, one
    identity after the other: the generator's order of draws. bench/train.py times this same function."""
    batches = []
    for name in t.names:
        sample = faces[name].sample(t.cfg.batch_size, generator)
        regions = sample.regions if t.cfg.loss.eyes_mouth else None  # None: no resampling of an all-zero map
        batches.append(augment(sample.faces, sample.masks, generator, t.cfg.augment, regions))
    return batches


def train(cfg: TrainConfig, progress: bool = True, resume: bool = False) -> Path:
    """Runs (or resumes) training; returns the path of the final checkpoint. Under torchrun, every process
    calls this; rank 0 writes."""
    _check_config(cfg)
    torch.set_num_threads(max(1, cfg.threads))
    world = Distributed.from_env()
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
        # A resumed run keeps its own augmentation unless told otherwise, even where the default has changed since.
        cfg = dataclasses.replace(cfg, model=saved["train_config"].model,
                                  augment=cfg.augment or saved["train_config"].augment)
        start_step = int(saved["step"])
    elif cfg.model is None:
        cfg = dataclasses.replace(cfg, model=preset_model(cfg.preset, names, cfg.variant))
    if cfg.augment is None:
        cfg = dataclasses.replace(cfg, augment=AugmentConfig.for_data(data_info["kind"]))
    assert cfg.model is not None
    if list(cfg.model.identities) != names:
        raise CheckpointError(f"the model's identities {list(cfg.model.identities)} differ from the data set's {names}")

    device = resolve_device(cfg.device)
    if world.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    # uint8 faces live on the training device; augmentation runs there (data.py). Eye/mouth maps only when weighted.
    loaded = load_faces(cfg.data_dir, resolution=cfg.model.resolution, regions=bool(cfg.loss.eyes_mouth))
    faces = {name: data.to(device) for name, data in loaded.items()}
    if world.world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        trainer = make_trainer(cfg, names, device, saved, world)
        del saved
        if world.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out_dir / CONFIG_NAME, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
        if start_step < cfg.steps:
            _loop(trainer, faces, start_step, ckpt_path, data_info, world, progress)
    finally:
        if world.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return ckpt_path


def _all_agree(flag: bool, world: Distributed, device: torch.device) -> bool:
    """True on every process once any process says so (ranks must stop at the same step)."""
    if world.world_size == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)  # the training device: NCCL reduces CUDA tensors only
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _loop(t: Trainer, faces: dict[str, IdentityFaces], start_step: int, ckpt_path: Path, data_info: dict[str, Any],
          world: Distributed, progress: bool) -> None:
    """The training loop proper: sample + augment, step, then (rank 0) log, preview and checkpoint."""
    cfg, out_dir = t.cfg, ckpt_path.parent
    writer = None
    if cfg.tensorboard and world.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the training extra installs it; a bare torch install may not have it
            log.warning("tensorboard is not installed: no event files (pip install tensorboard; --no-tensorboard "
                        "silences this)")
        else:
            # purge_step: a resumed run hides what the interrupted one logged after its last checkpoint.
            writer = SummaryWriter(log_dir=str(out_dir), purge_step=start_step or None)
    generator = torch.Generator()
    t.model.train()
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (progress and world.is_main), desc="train",
               unit="step", dynamic_ncols=True)
    smoothed = None
    started = time.perf_counter()
    for step in range(start_step, cfg.steps):
        generator.manual_seed(batch_seed(cfg, step, world.rank))
        # 1. one augmented batch per identity, on the training device
        batches = sample_batches(t, faces, generator)
        # 2-4. forward, losses, backward, optimizer step(s)
        terms = train_step(t, batches, step, generator)

        smoothed = terms["total"] if smoothed is None else 0.95 * smoothed + 0.05 * terms["total"]  # no sync
        bar.update(1)
        done = step + 1
        if world.is_main and (step % cfg.log_every == 0 or done == cfg.steps):
            bar.set_postfix(loss=f"{float(smoothed):.4f}", lr=f"{learning_rate(cfg, step):.1e}")
            if writer is not None:
                for key, value in terms.items():
                    writer.add_scalar(key if key == "grad_norm" else f"loss/{key}", float(value), done)
                writer.add_scalar("lr", learning_rate(cfg, step), done)
        if world.is_main and cfg.preview_every and (done % cfg.preview_every == 0 or done == cfg.steps):
            grid = preview_grid(t.average if t.average is not None else t.model, faces)
            _write_png(out_dir / PREVIEW_DIR / f"step_{done:06d}.png", grid)
            if writer is not None:
                writer.add_image("preview", grid, done, dataformats="HWC")
        # Under DDP the ranks agree on the budget every log_every steps only: each agreement is an all-reduce and a
        # device sync, which would stall every step; one process checks its own clock every step.
        out_of_time = bool(cfg.max_seconds) and (world.world_size == 1 or done % cfg.log_every == 0) and _all_agree(
            time.perf_counter() - started > cfg.max_seconds, world, t.device)
        if world.is_main and (done % cfg.checkpoint_every == 0 or done == cfg.steps or out_of_time):
            extra: dict[str, Any] = {"world_size": world.world_size}
            if t.critics is not None and t.critic_optimizer is not None:
                extra.update(critics=t.critics.state_dict(), critic_optimizer=t.critic_optimizer.state_dict())
            if t.scaler.is_enabled():
                extra["scaler"] = t.scaler.state_dict()
            if t.average is not None:
                extra["ema"] = t.average.state_dict()
            save_checkpoint(ckpt_path, cfg, t.model, t.optimizer, done, data_info, extra)
        if out_of_time:
            if world.is_main:
                bar.write(f"stopping at step {done} of {cfg.steps}: the {cfg.max_seconds:g} s time budget is spent")
            break
    bar.close()
    if writer is not None:
        writer.close()
    if world.world_size > 1:
        dist.barrier()  # every process returns once rank 0's final checkpoint is on disk
    elapsed = time.perf_counter() - started
    if progress and world.is_main:
        count = done - start_step
        precision = "float32" if t.autocast_dtype is None else f"{t.autocast_dtype}".replace("torch.", "") + " autocast"
        print(f"trained {count} steps in {elapsed:.1f} s ({count / elapsed:.2f} steps/s, {precision}), loss "
              f"{float(smoothed):.4f}; checkpoint {ckpt_path}")


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

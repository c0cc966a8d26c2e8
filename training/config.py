"""One training run's settings: the TrainConfig dataclass, the presets, the checks that need no data, and the
learning-rate schedule the settings describe."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from facetwin.core.bundle import VARIANTS
from facetwin.core.model import ModelConfig
from facetwin.training.amp import AMP_MODES
from facetwin.training.data import AugmentConfig
from facetwin.training.losses import LossWeights

# What each preset changes from the TrainConfig defaults (which are the demo's).
PRESET_OVERRIDES: dict[str, dict[str, Any]] = {
    "demo": {},
    # Seconds, any quality. One thread: the tiny model's ops are too small to split, a second thread only waits.
    # float32: tests give the same numbers on every host, with or without bf16 hardware.
    "tiny": {"steps": 200, "batch_size": 8, "checkpoint_every": 100, "threads": 1, "amp": "off"},
    # A GPU host: the 2017 deepfakes model (ModelConfig.original, 82 M parameters) at 4x the demo's batch. Its
    # 1,024-wide code diverged at the demo's lr 1e-3 (the latent-matching term reached 2e4 by step 61 on the CPU);
    # at 2e-4 it trained steadily through the 1,800 steps a CPU could afford; after 1,200 it already rebuilt held-out
    # faces better than the demo model does after 6,000 (face SSIM 0.755 vs 0.741; docs/benchmarks.md).
    # Its gradient norm (median 1.39, 99th percentile 2.4 over its first 319 steps on a CPU) clips at ~3x its
    # median, as the demo's (median 0.8) does at 2.
    "full": {"steps": 100_000, "batch_size": 16, "lr": 2e-4, "checkpoint_every": 2000, "grad_clip": 4.0},
    # 128 px on 2 CPU cores (ModelConfig.residual at the demo's widths; see PRESET_MODELS): the demo's recipe at half
    # its learning rate. At the demo's 1e-3 the model trained well on the real pair for 3,000 steps, then ran away
    # (gradient norm 0.6 -> 1.6 -> 124 within 60 steps, saturated masks, loss 0.07 -> 1.5 and stuck there).
    "cpu-128": {"steps": 9000, "lr": 5e-4, "checkpoint_every": 1000},
    # A GPU host at 128 / 256 px: the residual family at the reference autoencoder's size, trained as the full
    # preset's 2017 model is (its lr and clipping; a wide code diverges at the demo's lr 1e-3), at batches a GPU
    # fills. Never trained on a GPU yet.
    "gpu-128": {"steps": 100_000, "batch_size": 32, "lr": 2e-4, "checkpoint_every": 2000, "grad_clip": 4.0},
    "gpu-256": {"steps": 100_000, "batch_size": 16, "lr": 2e-4, "checkpoint_every": 2000, "grad_clip": 4.0},
}
PRESETS = tuple(PRESET_OVERRIDES)
# The model each preset trains, for a data set's identities.
PRESET_MODELS: dict[str, Callable[[Sequence[str]], ModelConfig]] = {
    "demo": ModelConfig.demo,
    "tiny": ModelConfig.tiny,
    "full": ModelConfig.original,
    # The demo model's widths at 128 px (its four halvings end at 8 px, not 4: the code reads a finer map), one
    # more Upscale, a ResidualBlock after each, and the demo's shared trunk (16 -> 64 px): 4.9 M parameters.
    "cpu-128": functools.partial(ModelConfig.residual, resolution=128, encoder_width=32, decoder_width=16,
                                 latent=64, shared_upscales=2),
    "gpu-128": functools.partial(ModelConfig.residual, resolution=128),  # 119 M parameters, 111 M per swap graph
    "gpu-256": functools.partial(ModelConfig.residual, resolution=256, encoder_width=64),  # 147 M, 125 M per graph
}


@dataclass
class TrainConfig:
    """One training run. The defaults are the CPU demo preset; `from_preset` gives any preset with overrides."""

    data_dir: str  # data set folder (synth layout with index.json)
    out_dir: str  # run folder (run_folder.py): checkpoint.pt, config.json, train_summary.json
    # "demo" (CPU demo quality), "tiny" (tests: seconds), "full" (the 2017 model, GPU hosts), "cpu-128" (128 px on a
    # CPU), "gpu-128" or "gpu-256" (128 / 256 px, GPU hosts); picks the model when model is None
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
    loss: LossWeights = field(default_factory=LossWeights)  # weights of the loss terms (losses.py)
    # None: AugmentConfig.for_data(the data set's kind): none for synthetic faces, a light affine for real ones
    augment: AugmentConfig | None = None
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)
    seed: int = 0  # seeds initialisation and batch sampling
    threads: int = 2  # torch CPU threads (the demo host has two cores)
    # On a CPU, use only as many of those threads as other processes leave cores free (cpu_share.py): one busy
    # process beside make demo's training slowed it 15x with a fixed two.
    follow_free_cores: bool = True
    device: str = "auto"  # "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ...
    model: ModelConfig | None = None  # None: the preset's model for the data set's identities
    variant: str = "ae"  # one of core.bundle.VARIANTS; must match model.variant if model is set
    # Mixed precision (amp.py): "auto" (bf16 where the device has it natively, else off), "off", "bf16" (autocast)
    # or "fp16" (autocast + GradScaler; for CUDA: it runs on a CPU, many times slower). The demo host has
    # AVX512-BF16: 6,048 steps in its 360 s, 4,087 in float32.
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
    """The model a preset trains for these identities, as `variant`."""
    if preset not in PRESET_MODELS:
        raise ValueError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
    config = PRESET_MODELS[preset](identities)
    if variant == config.variant:
        return config
    shared = 0 if variant == "cyclegan" else config.shared_upscales  # cyclegan's generators share nothing
    return dataclasses.replace(config, variant=variant, shared_upscales=shared)  # re-validates


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


# Faces per identity per step: the gpu presets' 32 several times over. Far more only fails to allocate (10^8 faces
# of 32 px) or gets the process killed for its memory (2 x 10^6).
MAX_BATCH = 1024
# Batch seeds are seed x 1,000,003 + step (step.py), which must fit the 64-bit integer torch seeds with.
MAX_SEED = 2**32 - 1


def check_config(cfg: TrainConfig) -> None:
    """Settings that are wrong whatever the data: fail before anything is read or written."""
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.checkpoint_every < 1 or cfg.log_every < 1:
        raise ValueError("steps, batch_size, checkpoint_every and log_every must be at least 1")
    if cfg.batch_size > MAX_BATCH:
        raise ValueError(f"batch_size must be at most {MAX_BATCH} faces per identity, got {cfg.batch_size}")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ValueError(f"seed must be between 0 and {MAX_SEED}, got {cfg.seed}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"lr must be a positive, finite learning rate, got {cfg.lr}")
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

"""One training step of a face-swap model (core/model.py: ae, vae, vae-gan or cyclegan), for every identity at once:

  1. sample a batch of each identity's faces, augment on the training device (affine + flip + colour on input
     and target alike; the random warp, where configured, on the input only): `sample_batches`;
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

Steps 2-5 are `train_step`, on a `Trainer` that `make_trainer` builds (and restores from a checkpoint).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from facetwin.core.model import CycleGAN, Discriminators, FaceSwapAutoencoder, build_discriminators, build_model
from facetwin.training import amp
from facetwin.training.checkpoint import CheckpointError, load_weights
from facetwin.training.config import TrainConfig, learning_rate
from facetwin.training.data import Augmented, IdentityFaces, augment, to_device
from facetwin.training.distributed import Distributed, wrap
from facetwin.training.losses import (
    cycle_consistency_loss,
    kl_divergence,
    latent_moment_gap,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    mask_loss,
    mixup_discriminator_loss,
    reconstruction_loss,
)


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
        return amp.autocast(self.device, self.autocast_dtype)

    def checkpoint_extra(self) -> dict[str, Any]:
        """What a checkpoint holds beyond the generator and its optimizer: critics, scaler, moving average."""
        extra: dict[str, Any] = {}
        if self.critics is not None and self.critic_optimizer is not None:
            extra.update(critics=self.critics.state_dict(), critic_optimizer=self.critic_optimizer.state_dict())
        if self.scaler.is_enabled():
            extra["scaler"] = self.scaler.state_dict()
        if self.average is not None:
            extra["ema"] = self.average.state_dict()
        return extra


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
    autocast_dtype = amp.autocast_dtype(cfg.amp, device, cfg.variant)
    scaler = amp.grad_scaler(autocast_dtype, device)
    if saved is not None:
        load_weights(model, saved["model"], "weights")  # optimizer state follows the parameters' device on load
        load_weights(optimizer, saved["optimizer"], "optimizer state")
        if critics is not None and critic_optimizer is not None:
            if "critics" not in saved or "critic_optimizer" not in saved:
                raise CheckpointError(f"the checkpoint of this {cfg.model.variant} run lacks its discriminators")
            load_weights(critics, saved["critics"], "discriminators")
            load_weights(critic_optimizer, saved["critic_optimizer"], "discriminators' optimizer state")
        if scaler.is_enabled() and "scaler" in saved:
            load_weights(scaler, saved["scaler"], "gradient scaler state")
    average = None
    if cfg.ema_decay:  # a run resumed without one starts averaging from its current weights
        average = copy.deepcopy(model).requires_grad_(False)
        if saved is not None and "ema" in saved:
            load_weights(average, saved["ema"], "averaged weights")
    forward = wrap(_TrainingForward(model), world, device)
    critics_forward = wrap(critics, world, device) if critics is not None else None
    return Trainer(cfg, names, device, model, forward, optimizer, critics, critics_forward, critic_optimizer,
                   autocast_dtype, scaler, average)


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


def train_step(t: Trainer, batches: list[Augmented], step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Steps 2-5: one optimizer step of the generator(s) (and of the discriminators) on one augmented batch per
    identity.

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

"""Losses: the faceswap family's reconstruction (L1 + structural dissimilarity (DSSIM), extra weight on eyes and
mouth, a mask loss against the data set's face mask), the shared latent's moment matching across identities, and
the variants' terms: the VAE's KL divergence, the least-squares GAN loss (with mixup) and CycleGAN's cycle
consistency.

SSIM follows Wang et al. 2004: an 11x11 Gaussian window with sigma 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2
with data range L (1 for training tensors), computed per channel (borders reflected) and averaged. It is the one
SSIM of the project: training/evaluate.py scores swaps with it too. DSSIM = (1 - SSIM) / 2, so identical images
score 0 and the loss lies in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11  # Gaussian window side, as in Wang et al. 2004
SSIM_SIGMA = 1.5  # Gaussian window sigma
SSIM_K1, SSIM_K2 = 0.01, 0.03  # stabilisers of the luminance and the contrast-structure terms


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, channels: int = 3,
                    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """A normalised 2-D Gaussian as a depthwise conv weight: (channels, 1, size, size)."""
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    window = torch.outer(g, g)
    return window.expand(channels, 1, size, size).contiguous()


def ssim_map(x: torch.Tensor, y: torch.Tensor, window_size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA,
             data_range: float = 1.0) -> torch.Tensor:
    """Per-pixel SSIM of two NCHW batches, same size as the input: (B, C, H, W).

    Borders are reflected so the map covers every pixel: a 64 px crop would otherwise leave its outer 5 px
    (30% of the pixels, mostly background) without a structural loss, yet evaluation scores them.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two NCHW tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"images of {tuple(x.shape[-2:])} px are smaller than the {window_size} px SSIM window")
    # The Gaussian is separable: one 1-D pass down, one across (2 x 11 taps instead of 121), over all five
    # statistics stacked as channels of one depthwise conv. Same values as the 2-D window (to float rounding),
    # half the time of five 2-D convs, which made up ~13 % of a demo training step.
    g = gaussian_window(window_size, sigma, 1, x.dtype, x.device)[0, 0].sum(dim=0)  # (size,), sums to 1
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B, 5C, H, W)
    k, pad = stack.shape[1], window_size // 2
    stack = F.pad(stack, (pad, pad, pad, pad), mode="reflect")
    stack = F.conv2d(stack, g.view(1, 1, window_size, 1).expand(k, 1, window_size, 1), groups=k)
    stack = F.conv2d(stack, g.view(1, 1, 1, window_size).expand(k, 1, 1, window_size), groups=k)
    mu_x, mu_y, e_xx, e_yy, e_xy = stack.chunk(5, dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x, var_y, cov_xy = e_xx - mu_xx, e_yy - mu_yy, e_xy - mu_xy
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    return ((2 * mu_xy + c1) * (2 * cov_xy + c2)) / ((mu_xx + mu_yy + c1) * (var_x + var_y + c2))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM over the batch (scalar); 1 for identical images."""
    return ssim_map(x, y, data_range=data_range).mean()


def dssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural dissimilarity (1 - SSIM) / 2: 0 for identical images."""
    return (1.0 - ssim(x, y, data_range)) / 2.0


def mask_loss(predicted: torch.Tensor, target: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """Loss of a predicted face mask in [0, 1] against the data set's mask in [0, 1]: "bce" or "l1"."""
    if predicted.shape != target.shape:
        raise ValueError(f"mask shapes differ: {tuple(predicted.shape)} vs {tuple(target.shape)}")
    if kind == "bce":
        # Clamp so a saturated sigmoid (exact 0 or 1 in float32) cannot produce log(0).
        return F.binary_cross_entropy(predicted.clamp(1e-6, 1 - 1e-6), target)
    if kind == "l1":
        return F.l1_loss(predicted, target)
    raise ValueError(f"mask loss kind {kind!r} is not 'bce' or 'l1'")


@dataclass(frozen=True)
class LossWeights:
    """How the terms add up; TrainConfig carries one of these."""

    l1: float = 1.0  # mean absolute error on RGB: gets colours right fast
    dssim: float = 1.0  # structure (edges, eyes, mouth); L1 alone gives blurry faces
    face: float = 0.0  # extra L1 inside the face mask; 0 here because synth scores the whole crop, but raise it
    # (e.g. 1.0) on real footage with busy backgrounds, where only the face matters
    mask: float = 0.1  # mask head vs the data set's mask: an auxiliary output, kept from stealing capacity
    mask_kind: str = "bce"  # "bce" (sharp edges) or "l1"
    # Extra L1 inside the eye and mouth regions (the seed's eye-aware training; DeepFaceLab's eyes_mouth_prio,
    # faceswap's eye/mouth multipliers): gaze and lips carry expression but cover ~5% of the crop, so plain L1
    # leaves them blurry. 0 here: the demo is tuned without it; try 1.0-3.0 on real footage.
    eyes_mouth: float = 0.0
    # Moment matching of the shared code across identities (latent_moment_gap; ae, vae, vae-gan): a swap feeds
    # A's codes to B's decoder, which only ever saw B's, so codes that differ by identity leak A into the swap.
    # On the synthetic demo, 1,000 steps: swap SSIM 0.660 without, 0.687 / 0.690 / 0.691 / 0.680 at 0.3 / 1 / 3 / 10.
    latent_match: float = 1.0
    kl: float = 1e-4  # KL(q(z|x) || N(0, I)) in nats per face (vae, vae-gan); the reconstruction is a per-pixel
    # mean, so this is the usual VAE balance of ~1/(3*64*64); larger smooths the latent but blurs the faces
    gan: float = 0.1  # least-squares adversarial term of each generator (vae-gan, cyclegan; faceswap-GAN: 0.1)
    mixup_alpha: float = 0.2  # discriminators see Beta(a, a) mixes of real and fake, as in faceswap-GAN; 0 = off
    cycle: float = 1.0  # CycleGAN cycle-consistency L1; the paper's lambda = 10 x the GAN weight
    identity: float = 1.0  # CycleGAN identity loss G(b) ~ b, as the full reconstruction loss (L1 + DSSIM + mask)


def region_l1(face: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean absolute error weighted by a (B, 1, H, W) map in [0, 1]: the mean over the weighted pixels only.
    Exactly 0 where the map is all zero (e.g. faces without landmarks)."""
    return (torch.abs(face - target) * weight).sum() / (weight.sum() * face.shape[1] + 1e-6)


def reconstruction_loss(face: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, target_mask: torch.Tensor,
                        weights: LossWeights = LossWeights(), target_regions: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss of one decoder's output against its un-warped target, plus each term for logging.

    target_regions: the eye/mouth weight map (B, 1, H, W) in [0, 1] of the target (data.py), or None.
    Terms are detached 0-d tensors (no device sync here; float() them to log).
    """
    l1 = F.l1_loss(face, target)
    structural = dssim(face, target)
    # Face-weighted L1: the mean over face pixels only (the mask is 0 on the background).
    face_l1 = region_l1(face, target, target_mask)
    mask_term = mask_loss(mask, target_mask, weights.mask_kind)
    total = weights.l1 * l1 + weights.dssim * structural + weights.face * face_l1 + weights.mask * mask_term
    terms = {"l1": l1.detach(), "dssim": structural.detach(), "face_l1": face_l1.detach(), "mask": mask_term.detach()}
    if target_regions is not None and weights.eyes_mouth:  # skipped at weight 0: the demo pays nothing for it
        eyes_mouth = region_l1(face, target, target_regions)
        total = total + weights.eyes_mouth * eyes_mouth
        terms["eyes_mouth_l1"] = eyes_mouth.detach()
    return total, terms


def latent_moment_gap(codes: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """How far apart the identities' latent codes lie as distributions: the squared differences of their
    per-dimension means and standard deviations, averaged over dimensions and over pairs of identities.

    codes: one (B, latent) batch per identity, encoded from faces whose pose, expression and lighting come from the
    same distribution, so any remaining difference in the codes' statistics is identity the encoder let through.
    Matching the first two moments (as in CORAL, Sun & Saenko 2016, per dimension) is the cheap end of
    distribution matching; 0 for one identity."""
    means = [c.mean(dim=0) for c in codes]
    stds = [c.std(dim=0, correction=0) for c in codes]  # population std: defined for a batch of one
    gaps = [((means[i] - means[j]) ** 2).mean() + ((stds[i] - stds[j]) ** 2).mean()
            for i in range(len(codes)) for j in range(i + 1, len(codes))]
    return torch.stack(gaps).mean() if gaps else codes[0].new_zeros(())


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) in closed form (Kingma & Welling 2014, appendix B), summed over
    the latent dimensions and averaged over the batch: 0 exactly when mu = 0 and logvar = 0."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()


def lsgan_discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """Least-squares GAN (Mao et al. 2017, a=0, b=1): the critic regresses real patches to 1, fakes to 0."""
    return 0.5 * (F.mse_loss(real_scores, torch.ones_like(real_scores))
                  + F.mse_loss(fake_scores, torch.zeros_like(fake_scores)))


def lsgan_generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """Least-squares GAN (c=1): the generator pushes the critic's scores of its outputs towards 'real'."""
    return F.mse_loss(fake_scores, torch.ones_like(fake_scores))


def mixup_discriminator_loss(mixed_scores: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Mixup for the critic, as in faceswap-GAN: it sees lam * real + (1 - lam) * fake and regresses every patch
    score to lam (B,) -- a smoother target than 1/0 that keeps the critic from overpowering the generator."""
    return F.mse_loss(mixed_scores, lam.view(-1, 1, 1, 1).expand_as(mixed_scores).to(mixed_scores.dtype))


def cycle_consistency_loss(cycled: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """CycleGAN's L1 between x and F(G(x)): the translation must keep enough of x to undo it."""
    return F.l1_loss(cycled, real)

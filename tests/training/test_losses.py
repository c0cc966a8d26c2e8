"""SSIM / DSSIM, the mask loss and the combined reconstruction loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facetwin.training.losses import (
    LossWeights,
    cycle_consistency_loss,
    dssim,
    gaussian_window,
    kl_divergence,
    latent_moment_gap,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    mask_loss,
    mixup_discriminator_loss,
    reconstruction_loss,
    region_l1,
    ssim,
    ssim_map,
)


def _images(seed: int = 0, batch: int = 2, side: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_gaussian_window_is_normalised_and_symmetric():
    window = gaussian_window(11, 1.5, channels=3)
    assert window.shape == (3, 1, 11, 11)
    assert torch.allclose(window.sum(dim=(1, 2, 3)), torch.ones(3))
    assert torch.allclose(window, window.flip(-1)) and torch.allclose(window, window.transpose(-1, -2))
    assert int(window[0, 0].argmax()) == 5 * 11 + 5  # peak in the centre


def test_identical_images_score_ssim_one_and_zero_loss():
    x = _images()
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(dssim(x, x)) == pytest.approx(0.0, abs=1e-5)
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    total, terms = reconstruction_loss(x, x, mask, mask)
    assert float(terms["l1"]) == 0 and float(terms["face_l1"]) == 0
    assert float(terms["dssim"]) == pytest.approx(0.0, abs=1e-5)
    assert float(terms["mask"]) < 1e-4  # BCE of a perfect binary mask (clamped away from log(0))
    assert float(total) < 1e-4


def test_ssim_of_flat_images_matches_the_closed_form():
    """Zero variance leaves only the luminance term: (2 mx my + C1) / (mx^2 + my^2 + C1)."""
    a, b = torch.full((1, 3, 16, 16), 0.2), torch.full((1, 3, 16, 16), 0.6)
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert float(ssim(a, b)) == pytest.approx(expected, rel=1e-4)


def test_ssim_is_symmetric_and_drops_with_noise():
    x = _images(1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    slightly, badly = (x + 0.05 * noise).clamp(0, 1), (x + 0.3 * noise).clamp(0, 1)
    assert float(ssim(x, slightly)) == pytest.approx(float(ssim(slightly, x)), abs=1e-6)
    assert 1.0 > float(ssim(x, slightly)) > float(ssim(x, badly))
    assert 0.0 < float(dssim(x, slightly)) < float(dssim(x, badly)) <= 1.0


def test_ssim_map_covers_every_pixel():
    x, y = _images(), _images(3)
    assert ssim_map(x, y).shape == (2, 3, 32, 32)
    damaged = x.clone()
    damaged[..., 0, 0] = 1 - damaged[..., 0, 0]  # a corner pixel: outside any unpadded 11x11 window's centre
    assert float(ssim_map(x, damaged)[..., 0, 0].mean()) < 0.99


def test_gradients_flow_to_the_prediction():
    target = _images(4)
    pred = _images(5).requires_grad_(True)
    mask_pred = torch.full((2, 1, 32, 32), 0.5, requires_grad=True)
    mask_true = (torch.rand(2, 1, 32, 32) > 0.5).float()
    total, _ = reconstruction_loss(pred, target, mask_pred, mask_true)
    total.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert mask_pred.grad is not None and mask_pred.grad.abs().sum() > 0


def test_loss_weights_scale_their_terms():
    pred, target = _images(6), _images(7)
    mask = torch.ones(2, 1, 32, 32)
    only_l1, terms = reconstruction_loss(pred, target, mask * 0.5, mask, LossWeights(l1=2.0, dssim=0, face=0, mask=0))
    assert float(only_l1) == pytest.approx(2 * float(terms["l1"]), rel=1e-5)
    # With a full mask the face-weighted L1 equals the plain L1.
    assert float(terms["face_l1"]) == pytest.approx(float(terms["l1"]), rel=1e-4)


def test_face_l1_ignores_the_background():
    target = torch.zeros(1, 3, 16, 16)
    pred = target.clone()
    pred[..., :8] = 1.0  # wrong only on the left half
    right_half = torch.zeros(1, 1, 16, 16)
    right_half[..., 8:] = 1.0
    _, terms = reconstruction_loss(pred, target, right_half, right_half)
    assert float(terms["face_l1"]) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["l1"]) == pytest.approx(0.5)


def test_mask_loss_kinds_and_errors():
    pred, true = torch.full((1, 1, 4, 4), 0.75), torch.ones(1, 1, 4, 4)
    assert float(mask_loss(pred, true, "l1")) == pytest.approx(0.25)
    assert float(mask_loss(pred, true, "bce")) == pytest.approx(-torch.log(torch.tensor(0.75)).item(), rel=1e-5)
    assert torch.isfinite(mask_loss(torch.zeros(1, 1, 4, 4), true, "bce"))  # saturated prediction, no inf
    with pytest.raises(ValueError, match="bce"):
        mask_loss(pred, true, "hinge")
    with pytest.raises(ValueError, match="shapes differ"):
        mask_loss(pred, torch.ones(1, 1, 4, 5))


def test_ssim_rejects_mismatched_or_tiny_images():
    with pytest.raises(ValueError, match="one shape"):
        ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 17))
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def reference_ssim_map(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Wang et al. 2004, eq. 13 with the Gaussian-weighted statistics of eqs. 14-16 (11x11 window, sigma 1.5,
    K1 = 0.01, K2 = 0.03), pixel by pixel in float64, borders reflected: written from the paper, independent of
    ssim_map's separable convolutions."""
    offsets = np.arange(-5, 6)
    g = np.exp(-(offsets**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    px, py = np.pad(x, 5, mode="reflect"), np.pad(y, 5, mode="reflect")
    out = np.empty(x.shape)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            a, b = px[i:i + 11, j:j + 11], py[i:i + 11, j:j + 11]
            mu_a, mu_b = (w * a).sum(), (w * b).sum()
            var_a, var_b = (w * (a - mu_a) ** 2).sum(), (w * (b - mu_b) ** 2).sum()
            cov = (w * (a - mu_a) * (b - mu_b)).sum()
            out[i, j] = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return out


def test_ssim_map_is_the_papers_definition():
    # One window that covers the whole 11x11 image: no border involved, a number computed once from the formula.
    i, j = np.mgrid[0:11, 0:11]
    x = (i + 2 * j) / 30.0
    assert reference_ssim_map(x, x**2)[5, 5] == pytest.approx(0.8134414149266, rel=1e-12)
    centre = ssim_map(torch.from_numpy(x)[None, None], torch.from_numpy(x**2)[None, None])[0, 0, 5, 5]
    assert float(centre) == pytest.approx(0.8134414149266, rel=1e-12)
    # Every pixel of a random pair, borders included, per channel.
    rng = np.random.default_rng(7)
    a = rng.random((2, 16, 20))
    b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    got = ssim_map(torch.from_numpy(a)[None], torch.from_numpy(b)[None])[0].numpy()
    for channel in range(2):
        np.testing.assert_allclose(got[channel], reference_ssim_map(a[channel], b[channel]), rtol=0, atol=1e-12)


def test_the_evaluation_ssim_is_the_same_definition_on_0_255_images():
    """training/evaluate.py scores swaps with the loss's SSIM: HxWxC images in 0..255, channels averaged, and with a
    mask the mean over the masked pixels (in float32, as training computes it)."""
    from facetwin.training.evaluate import ssim as evaluate_ssim

    rng = np.random.default_rng(8)
    a = rng.integers(0, 256, (24, 24, 3)).astype(np.float64)
    b = np.clip(a + rng.normal(0, 30, a.shape), 0, 255)
    want = np.mean([reference_ssim_map(a[..., c], b[..., c], 255.0) for c in range(3)], axis=0)
    assert evaluate_ssim(a, b) == pytest.approx(want.mean(), abs=1e-5)
    mask = np.zeros((24, 24), np.uint8)
    mask[4:12, 6:20] = 255
    assert evaluate_ssim(a, b, mask) == pytest.approx(want[mask > 0].mean(), abs=1e-5)


def test_eyes_and_mouth_weigh_only_inside_their_map():
    target = torch.zeros(1, 3, 16, 16)
    pred = target.clone()
    pred[..., 4:6, 4:6] = 1.0  # wrong on a 2x2 "eye"
    eye = torch.zeros(1, 1, 16, 16)
    eye[..., 3:7, 3:7] = 1.0  # the eye region: 16 px, 4 of them wrong
    plain, _ = reconstruction_loss(pred, target, eye, eye, LossWeights(dssim=0, mask=0))
    weighted, terms = reconstruction_loss(pred, target, eye, eye, LossWeights(dssim=0, mask=0, eyes_mouth=2.0), eye)
    assert float(terms["eyes_mouth_l1"]) == pytest.approx(4 / 16, rel=1e-4)
    assert float(weighted - plain) == pytest.approx(2.0 * 4 / 16, rel=1e-4)
    # An empty map (faces without landmarks) adds exactly nothing, and weight 0 keeps the old loss.
    assert float(region_l1(pred, target, torch.zeros_like(eye))) == 0.0
    unweighted, _ = reconstruction_loss(pred, target, eye, eye, LossWeights(dssim=0, mask=0), eye)
    assert float(unweighted) == float(plain)


def test_kl_divergence_is_zero_for_the_prior_and_falls_when_optimised():
    zeros = torch.zeros(4, 8)
    assert float(kl_divergence(zeros, zeros)) == 0.0
    # Closed form for one dimension: 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2).
    mu, logvar = torch.full((1, 1), 1.5), torch.full((1, 1), -1.0)
    expected = 0.5 * (1.5**2 + torch.exp(torch.tensor(-1.0)) - 1 + 1.0)
    assert float(kl_divergence(mu, logvar)) == pytest.approx(float(expected), rel=1e-6)
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 8, generator=generator).requires_grad_(True)
    logvar = torch.randn(4, 8, generator=generator).requires_grad_(True)
    optimizer = torch.optim.SGD([mu, logvar], lr=0.1)
    values = []
    for _ in range(60):
        loss = kl_divergence(mu, logvar)
        values.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(a > b for a, b in zip(values, values[1:])) and values[-1] < 0.2 * values[0]


def test_least_squares_gan_losses_are_zero_at_their_optimum():
    ones, zeros = torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    assert float(lsgan_discriminator_loss(ones, zeros)) == 0.0  # real scored 1, fake 0: a perfect critic
    assert float(lsgan_discriminator_loss(zeros, ones)) == pytest.approx(1.0)
    assert float(lsgan_generator_loss(ones)) == 0.0  # the critic takes the fakes for real
    assert float(lsgan_generator_loss(zeros)) == pytest.approx(1.0)
    lam = torch.tensor([0.2, 0.9])
    assert float(mixup_discriminator_loss(lam.view(2, 1, 1, 1).expand(2, 1, 4, 4), lam)) == 0.0
    assert float(mixup_discriminator_loss(zeros, lam)) == pytest.approx((0.2**2 + 0.9**2) / 2)


def test_cycle_consistency_is_l1_to_the_original():
    x = _images(10)
    assert float(cycle_consistency_loss(x, x)) == 0.0
    assert float(cycle_consistency_loss(x, 1 - x)) == pytest.approx(float((2 * x - 1).abs().mean()))


def test_latent_moment_gap_is_zero_for_one_distribution_and_pulls_two_together():
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(8, 16, generator=g)
    assert latent_moment_gap([codes, codes.flip(0)]).item() == pytest.approx(0.0, abs=1e-7)  # same moments
    assert latent_moment_gap([codes]).item() == 0.0  # one identity: nothing to match
    # Stretched about its mean and shifted by 1: mean gap 1, std gap = the std, averaged over dimensions.
    mean = codes.mean(dim=0)
    shifted = (codes - mean) * 2 + mean + 1
    expected = 1.0 + (codes.std(dim=0, correction=0) ** 2).mean().item()
    assert latent_moment_gap([codes, shifted]).item() == pytest.approx(expected, rel=1e-5)
    assert latent_moment_gap([codes[:1], shifted[:1]]).isfinite()  # a batch of one: defined (population std)
    # Gradient descent on the gap moves B's codes onto A's statistics.
    b = shifted.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([b], lr=0.05)
    start = latent_moment_gap([codes, b]).item()
    for _ in range(300):
        optimizer.zero_grad()
        latent_moment_gap([codes, b]).backward()
        optimizer.step()
    assert latent_moment_gap([codes, b]).item() < 0.01 * start

"""Synthetic occluders: drawn over the face, reproducible from the step's generator, left out of the mask target."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from facetwin.training import occluders, synth
from facetwin.training.data import AugmentConfig, augment


def rendered_faces(count: int = 12, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out synthetic faces as training batches: uint8 (N, 3, R, R) and masks (N, 1, R, R)."""
    ident = synth.make_identity(0, 0)
    out = [synth.render(ident, pose, size) for pose in synth.test_poses(count, 7)]
    faces = torch.from_numpy(np.stack([o[0] for o in out])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([o[1] for o in out]))[:, None].contiguous()
    return faces, masks


def floats(faces: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return faces.float() / 255.0, masks.float() / 255.0


def test_every_face_gets_an_occluder_over_its_face_and_nothing_else_changes():
    x, m = floats(*rendered_faces())
    out, coverage = occluders.occlude(x, m, torch.Generator().manual_seed(0), 1.0)
    assert out.shape == x.shape and coverage.shape == m.shape
    assert float(coverage.min()) >= 0.0 and float(coverage.max()) <= 1.0
    on_face = (coverage * m).sum(dim=(1, 2, 3))
    assert (on_face > 3).float().mean() >= 0.9  # nearly every occluder lies (partly) over its face
    share = on_face / m.sum(dim=(1, 2, 3))
    assert 0.03 < float(share.mean()) < 0.6  # covers part of the face, not all of it
    untouched = (coverage == 0).expand_as(x)
    assert torch.equal(out[untouched], x[untouched])  # pixels without an occluder are the face's own
    assert float((out - x).abs()[(coverage > 0.99).expand_as(x)].mean()) > 0.05  # and under one they are not


def test_the_generator_alone_decides_the_occluders():
    x, m = floats(*rendered_faces(8))
    a = occluders.occlude(x, m, torch.Generator().manual_seed(3), 0.5)
    b = occluders.occlude(x, m, torch.Generator().manual_seed(3), 0.5)
    c = occluders.occlude(x, m, torch.Generator().manual_seed(4), 0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    drawn = (a[1].sum(dim=(1, 2, 3)) > 0).sum()
    assert 0 < drawn < 8  # probability 0.5: some faces, not all (for this seed)
    none, coverage = occluders.occlude(x, m, torch.Generator().manual_seed(3), 0.0)
    assert none is x and not coverage.any()
    with pytest.raises(ValueError, match="probability must be in 0..1"):
        occluders.occlude(x, m, torch.Generator(), 1.5)


@pytest.mark.parametrize("kind", occluders.KINDS)
def test_each_kind_is_drawn_from_capsules_near_the_face(kind):
    rng = np.random.default_rng(0)
    for _ in range(20):
        drawn = occluders.draw(rng, kind)
        used = drawn.capsules[drawn.capsules[:, 4] > 0]
        assert 1 <= len(used) <= occluders.MAX_CAPSULES
        ends = used[:, :4].reshape(-1, 2)
        assert np.linalg.norm(ends, axis=1).min() < 1.6  # some part reaches the face (1 = its radius)
        assert 0.0 <= drawn.own_skin <= 1.0 and 0.0 < drawn.opacity <= 1.0
    with pytest.raises(ValueError, match="not one of"):
        occluders.draw(rng, "umbrella")


def test_a_hand_in_the_faces_own_skin_takes_the_face_colour():
    side = 64
    skin = torch.tensor([0.8, 0.55, 0.4])
    x = skin.view(1, 3, 1, 1).expand(2, 3, side, side).clone()  # a flat skin-coloured face filling the crop
    x[1] = 0.2  # and a grey one
    m = torch.ones(2, 1, side, side)
    rng = np.random.default_rng(1)
    hands = [h for h in (occluders.draw(rng, "hand") for _ in range(60)) if h.own_skin == 1.0][:2]
    flat = [h._replace(rim=0.0, noise=0.0, gradient=np.zeros(2)) for h in hands]  # no shading: the colour itself
    out, alpha = occluders.paint(x, m, flat, np.zeros((2, 1, occluders.NOISE_GRID, occluders.NOISE_GRID)))
    for i, hand in enumerate(flat):
        solid = alpha[i, 0] == 1.0
        assert solid.sum() > 20
        colour = out[i][:, solid].mean(dim=1)
        assert torch.allclose(colour, x[i, :, 0, 0] * torch.from_numpy(hand.colour).float(), atol=1e-5)
        assert float((colour / x[i, :, 0, 0] - 1).abs().max()) <= 0.15 + 1e-5  # the gain: within +-15 %


def test_face_frames_are_the_masks_centroid_and_disc_radius():
    side = 64
    yy, xx = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    disc = (((xx - 40) ** 2 + (yy - 24) ** 2) <= 12 ** 2).float()
    frames = occluders.face_frames(torch.stack([disc, torch.zeros(side, side)])[:, None])
    assert frames[0].tolist() == pytest.approx([40 / side, 24 / side, 12 / side], abs=0.01)
    assert frames[1].tolist() == pytest.approx(list(occluders.EMPTY_FACE))


def test_augment_keeps_the_clean_face_as_target_and_the_occluder_out_of_the_mask():
    faces, masks = rendered_faces(8)
    config = dataclasses.replace(AugmentConfig.synthetic(), face_color=0.0, occluders=1.0)
    out = augment(faces, masks, torch.Generator().manual_seed(0), config)
    x, m = floats(faces, masks)
    assert torch.equal(out.target, x)  # no geometry in the synthetic recipe: the target is the face itself
    assert float((out.target_mask - m).max()) <= 0 and float((m - out.target_mask).sum()) > 100
    hidden = (m - out.target_mask) > 0.5
    assert float((out.inputs - out.target).abs().amax(dim=1, keepdim=True)[hidden].mean()) > 0.05
    # the occluder is exactly what occlude draws from the same draws of the generator
    _, coverage = occluders.occlude(x, m, torch.Generator().manual_seed(0), 1.0)
    assert torch.allclose(out.target_mask, m * (1 - coverage))
    plain = augment(faces, masks, torch.Generator().manual_seed(0), dataclasses.replace(config, occluders=0.0))
    assert torch.equal(plain.inputs, x) and torch.equal(plain.target_mask, m)


def test_augment_moves_the_occluder_with_the_geometry():
    """Every input flipped: the mask target's hole lies where the flipped input shows the occluder, not where it was
    drawn on the face before the flip."""
    faces, masks = rendered_faces(6)
    config = dataclasses.replace(AugmentConfig.footage(), rotation_deg=0.0, scale=0.0, shift=0.0, flip=1.0,
                                 face_color=0.0, occluders=1.0)
    out = augment(faces, masks, torch.Generator().manual_seed(5), config)
    # the same geometry without occluders (the occluder's draws come after the affine's)
    plain = augment(faces, masks, torch.Generator().manual_seed(5), dataclasses.replace(config, occluders=0.0))
    assert torch.equal(plain.target, out.target)
    hole = (plain.target_mask - out.target_mask) > 0.5
    shown = ((out.inputs - plain.inputs).abs().amax(dim=1, keepdim=True) > 0.03) & (plain.target_mask > 0.5)

    def iou(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a & b).sum() / (a | b).sum())

    assert iou(hole, shown) > 0.75 and iou(hole.flip(-1), shown) < 0.3

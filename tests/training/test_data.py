"""Loading the synth folder layout and the faceswap-style augmentation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from facetwin.training import synth
from facetwin.training.data import (
    AugmentConfig, DatasetError, IdentityFaces, augment, describe, load_faces, load_index,
)

NO_AUGMENT = AugmentConfig(rotation_deg=0, scale=0, shift=0, flip=0, warp=0, brightness=0, contrast=0, saturation=0,
                           face_color=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return synth.write_dataset(tmp_path_factory.mktemp("data") / "faces", identities=2, images=6, size=32, seed=3,
                               progress=False)


@pytest.fixture()
def batch(dataset):
    faces = load_faces(dataset)
    return faces["ada"].sample(5, torch.Generator().manual_seed(0))


def test_loads_every_identity_as_uint8_tensors(dataset):
    faces = load_faces(dataset)
    assert list(faces) == ["ada", "ben"]  # index order = decoder order
    for ident in faces.values():
        assert isinstance(ident, IdentityFaces) and len(ident) == 6
        assert ident.faces.dtype == torch.uint8 and ident.faces.shape == (6, 3, 32, 32)
        assert ident.masks.dtype == torch.uint8 and ident.masks.shape == (6, 1, 32, 32)
        assert ident.masks.max() == 255 and ident.masks.min() == 0
        face, mask = ident[0]  # the Dataset view: float in [0, 1]
        assert face.dtype == torch.float32 and float(face.max()) <= 1.0 and mask.shape == (1, 32, 32)


def test_images_are_rgb_as_rendered(dataset):
    index = load_index(dataset)
    entry = index["images"][0]
    ident = synth.identity_from_dict(index["identities"][0])
    image, _ = synth.render(ident, synth.pose_from_dict(entry["pose"]), 32)
    loaded = load_faces(dataset)["ada"].faces[0].permute(1, 2, 0).numpy()
    assert (loaded == image).all()  # PNG is lossless and the channel order survived cv2's BGR


def test_resizes_to_the_model_resolution(dataset):
    faces = load_faces(dataset, resolution=16)
    assert faces["ben"].faces.shape == (6, 3, 16, 16) and faces["ben"].masks.shape == (6, 1, 16, 16)


def test_describe_records_what_evaluation_needs(dataset):
    info = describe(load_index(dataset))
    assert info == {"kind": "synth", "seed": 3, "size": 32, "identities": ["ada", "ben"]}


def test_sample_is_reproducible_with_a_generator(dataset):
    ident = load_faces(dataset)["ada"]
    a = ident.sample(4, torch.Generator().manual_seed(1))
    b = ident.sample(4, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (4, 3, 32, 32) and a[1].shape == (4, 1, 32, 32)


def test_missing_folder_and_missing_index_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_faces(tmp_path / "nope")
    with pytest.raises(DatasetError, match="index.json is missing"):
        load_faces(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_faces(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"schema": "something/2"}))
    with pytest.raises(DatasetError, match="schema"):
        load_faces(tmp_path)


def test_one_identity_is_not_enough(dataset, tmp_path):
    index = load_index(dataset)
    index["identities"] = index["identities"][:1]
    index["images"] = [e for e in index["images"] if e["identity"] == "ada"]
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(DatasetError, match="at least 2 identities"):
        load_faces(tmp_path)


def test_missing_image_file_names_the_file(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    (copy / "ben" / "00002.png").unlink()
    with pytest.raises(DatasetError, match="00002.png"):
        load_faces(copy)


def test_augment_with_everything_off_is_the_identity(batch):
    faces, masks = batch
    inputs, target, target_mask = augment(faces, masks, torch.Generator().manual_seed(0), NO_AUGMENT)
    expected = faces.float() / 255
    assert torch.allclose(inputs, expected, atol=1e-5) and torch.allclose(target, expected, atol=1e-5)
    assert torch.allclose(target_mask, masks.float() / 255, atol=1e-5)


def test_random_warp_changes_the_input_only(batch):
    faces, masks = batch
    config = AugmentConfig(**{**NO_AUGMENT.__dict__, "warp": 0.03})
    inputs, target, target_mask = augment(faces, masks, torch.Generator().manual_seed(0), config)
    expected = faces.float() / 255
    assert torch.allclose(target, expected, atol=1e-5)  # the decoder must produce the un-warped face
    assert torch.allclose(target_mask, masks.float() / 255, atol=1e-5)
    assert float((inputs - expected).abs().mean()) > 0.005


def test_flip_applies_to_input_target_and_mask_alike(batch):
    faces, masks = batch
    config = AugmentConfig(**{**NO_AUGMENT.__dict__, "flip": 1.0})
    inputs, target, target_mask = augment(faces, masks, torch.Generator().manual_seed(0), config)
    expected = (faces.float() / 255).flip(-1)
    assert torch.allclose(target, expected, atol=1e-5) and torch.allclose(inputs, expected, atol=1e-5)
    assert torch.allclose(target_mask, (masks.float() / 255).flip(-1), atol=1e-5)


def test_default_augment_is_in_range_reproducible_and_geometry_shared(batch):
    faces, masks = batch
    first = augment(faces, masks, torch.Generator().manual_seed(7))
    second = augment(faces, masks, torch.Generator().manual_seed(7))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    inputs, target, target_mask = first
    assert inputs.shape == target.shape == (5, 3, 32, 32) and target_mask.shape == (5, 1, 32, 32)
    for t in first:
        assert t.dtype == torch.float32 and float(t.min()) >= 0 and float(t.max()) <= 1
    # The affine moved the target away from the raw face, but input and target still show the same face.
    assert float((target - faces.float() / 255).abs().mean()) > 0.01
    assert float((inputs - target).abs().mean()) < float((target - faces.float() / 255).abs().mean())


def test_face_recolouring_touches_the_input_near_the_face_only(batch):
    faces, masks = batch
    config = AugmentConfig(**{**NO_AUGMENT.__dict__, "face_color": 1.0, "face_color_grow": 0.05})
    inputs, target, _ = augment(faces, masks, torch.Generator().manual_seed(0), config)
    expected = faces.float() / 255
    assert torch.allclose(target, expected, atol=1e-5)  # the target keeps the identity's true colours
    changed = (inputs - expected).abs().amax(dim=1, keepdim=True) > 1e-4
    face = masks > 0
    assert changed[face].float().mean() > 0.9  # the face is recoloured ...
    near = torch.nn.functional.max_pool2d(face.float(), 9, stride=1, padding=4) > 0
    assert not changed[~near].any()  # ... and pixels well away from it are not

"""Loading the synth folder layout and the faceswap-style augmentation."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import pytest
import torch

from facetwin.training import synth
from facetwin.training.data import (
    AugmentConfig,
    DatasetError,
    IdentityFaces,
    augment,
    describe,
    load_faces,
    load_index,
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


@pytest.mark.parametrize(("change", "message"), [
    (lambda index: index["identities"][0].update(name="john.doe"), "use 1-64 letters, digits, '_' or '-', starting"),
    (lambda index: index["identities"].__setitem__(0, "ada"), r"identities\[0\] must be an object"),
    (lambda index: index["images"][0].pop("file"), r"images\[0\] must be an object with"),
    (lambda index: index["images"].__setitem__(1, "ada/00000.png"), r"images\[1\] must be an object"),
    (lambda index: index["images"][2].update(file="../elsewhere.png"), "leaves the data folder"),
    (lambda index: index["images"][2].update(mask="/etc/mask.png"), "leaves the data folder"),
], ids=["dotted-name", "identity-not-object", "image-without-file", "image-not-object", "file-above", "mask-absolute"])
def test_an_index_entry_that_cannot_be_trained_on_is_refused_by_position(dataset, tmp_path, change, message):
    """Each identity names a decoder of the model (no '.' in module names); each image names files inside the data
    set's folder."""
    index = load_index(dataset)
    change(index)
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(DatasetError, match=message):
        load_index(tmp_path)


def test_missing_image_file_names_the_file(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    (copy / "ben" / "00002.png").unlink()
    with pytest.raises(DatasetError, match="00002.png"):
        load_faces(copy)


@pytest.mark.parametrize("side", [2, 400])
def test_an_image_of_another_size_than_the_index_says_is_refused_naming_it(dataset, tmp_path, side):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    size = json.loads((copy / "index.json").read_text())["size"]
    for name in ("00002.png", "00002_mask.png"):  # face and mask agree with each other, not with the index
        image = cv2.imread(str(copy / "ben" / name), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(copy / "ben" / name), cv2.resize(image, (side, side)))
    with pytest.raises(DatasetError, match=f"ben/00002.png is {side}x{side} px, but .* faces are {size} px"):
        load_faces(copy, resolution=size)


def test_augment_with_everything_off_is_the_identity(batch):
    faces, masks, _ = batch
    inputs, target, target_mask, _ = augment(faces, masks, torch.Generator().manual_seed(0), NO_AUGMENT)
    expected = faces.float() / 255
    assert torch.allclose(inputs, expected, atol=1e-5) and torch.allclose(target, expected, atol=1e-5)
    assert torch.allclose(target_mask, masks.float() / 255, atol=1e-5)


def test_random_warp_changes_the_input_only(batch):
    faces, masks, _ = batch
    config = AugmentConfig(**{**NO_AUGMENT.__dict__, "warp": 0.03})
    inputs, target, target_mask, _ = augment(faces, masks, torch.Generator().manual_seed(0), config)
    expected = faces.float() / 255
    assert torch.allclose(target, expected, atol=1e-5)  # the decoder must produce the un-warped face
    assert torch.allclose(target_mask, masks.float() / 255, atol=1e-5)
    assert float((inputs - expected).abs().mean()) > 0.005


def test_flip_applies_to_input_target_and_mask_alike(batch):
    faces, masks, _ = batch
    config = AugmentConfig(**{**NO_AUGMENT.__dict__, "flip": 1.0})
    inputs, target, target_mask, _ = augment(faces, masks, torch.Generator().manual_seed(0), config)
    expected = (faces.float() / 255).flip(-1)
    assert torch.allclose(target, expected, atol=1e-5) and torch.allclose(inputs, expected, atol=1e-5)
    assert torch.allclose(target_mask, (masks.float() / 255).flip(-1), atol=1e-5)


def test_default_augment_is_in_range_reproducible_and_geometry_shared(batch):
    faces, masks, _ = batch
    first = augment(faces, masks, torch.Generator().manual_seed(7))
    second = augment(faces, masks, torch.Generator().manual_seed(7))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    inputs, target, target_mask, target_regions = first
    assert not target_regions.any()  # no eye/mouth map given: no extra weight anywhere
    assert inputs.shape == target.shape == (5, 3, 32, 32) and target_mask.shape == (5, 1, 32, 32)
    for t in first:
        assert t.dtype == torch.float32 and float(t.min()) >= 0 and float(t.max()) <= 1
    # The affine moved the target away from the raw face, but input and target still show the same face.
    assert float((target - faces.float() / 255).abs().mean()) > 0.01
    assert float((inputs - target).abs().mean()) < float((target - faces.float() / 255).abs().mean())


def test_synthetic_faces_train_without_geometry_and_real_faces_with_it(batch):
    synthetic, footage = AugmentConfig.for_data("synth"), AugmentConfig.for_data("faces")
    assert synthetic == AugmentConfig.synthetic() and footage == AugmentConfig.footage()
    assert not synthetic.geometric and footage.geometric and footage.rotation_deg > 0
    assert footage.warp == 0 < AugmentConfig().warp  # faceswap's warp stilled the swapped mouth: one setting away
    assert synthetic.face_color == footage.face_color > 0  # both still recolour the input's face
    faces, masks, _ = batch
    inputs, target, target_mask, _ = augment(faces, masks, torch.Generator().manual_seed(0), synthetic)
    # The targets are the rendered faces bit for bit (no bilinear round trip), the input differs by its colours only.
    assert torch.equal(target, faces.float() / 255) and torch.equal(target_mask, masks.float() / 255)
    background = (masks == 0).expand_as(inputs) & (inputs == target)
    assert float(background.float().mean()) > 0.2 and not torch.equal(inputs, target)
    moved, _, _, _ = augment(faces, masks, torch.Generator().manual_seed(0), footage)
    assert float((moved - faces.float() / 255).abs().mean()) > 0.01


def test_face_recolouring_touches_the_input_near_the_face_only(batch):
    faces, masks, _ = batch
    config = AugmentConfig(**{**NO_AUGMENT.__dict__, "face_color": 1.0, "face_color_grow": 0.05})
    inputs, target, _, _ = augment(faces, masks, torch.Generator().manual_seed(0), config)
    expected = faces.float() / 255
    assert torch.allclose(target, expected, atol=1e-5)  # the target keeps the identity's true colours
    changed = (inputs - expected).abs().amax(dim=1, keepdim=True) > 1e-4
    face = masks > 0
    assert changed[face].float().mean() > 0.9  # the face is recoloured ...
    near = torch.nn.functional.max_pool2d(face.float(), 9, stride=1, padding=4) > 0
    assert not changed[~near].any()  # ... and pixels well away from it are not


def test_synthetic_faces_carry_an_eye_and_mouth_map_from_the_renderer(dataset):
    ident = load_faces(dataset)["ada"]
    assert ident.regions.dtype == torch.uint8 and ident.regions.shape == (6, 1, 32, 32)
    regions, masks = ident.regions.float() / 255, ident.masks.float() / 255
    per_face = regions.mean(dim=(1, 2, 3))
    assert (per_face > 0.02).all() and (per_face < 0.3).all()  # eyes and mouth: a small part of every crop
    assert float((regions * masks).sum() / regions.sum()) > 0.8  # on the face, not the background or hair
    # Eyes above the mouth: the map has weight in both the upper and the lower half of the face.
    assert (regions[..., 8:16, :].sum(dim=(1, 2, 3)) > 0).all() and (regions[..., 17:26, :].sum(dim=(1, 2, 3)) > 0).all()
    resized = load_faces(dataset, resolution=16)["ada"].regions
    assert resized.shape == (6, 1, 16, 16) and (resized.float().mean(dim=(1, 2, 3)) > 0).all()


def _landmarks(eye_y: float, mouth_y: float) -> list[list[float]]:
    """68 points with only what the weight map reads placed on purpose: both eyes at eye_y, the lips at mouth_y."""
    points = [[16.0, 16.0]] * 68
    for group, cx in ((range(36, 42), 10.0), (range(42, 48), 22.0)):
        for k, i in enumerate(group):
            angle = 2 * 3.14159 * k / 6
            points[i] = [cx + 3 * math.cos(angle), eye_y + 1.5 * math.sin(angle)]
    for k, i in enumerate(range(48, 68)):
        angle = 2 * 3.14159 * k / 20
        points[i] = [16 + 5 * math.cos(angle), mouth_y + 2 * math.sin(angle)]
    return points


def test_extracted_faces_get_their_map_from_the_68_landmarks(dataset, tmp_path):
    """A facetwin-faces/1 index (extract.py) with landmarks on one face and none (a Haar detection) on another."""
    shutil.copytree(dataset, tmp_path / "faces")
    synth_index = json.loads((tmp_path / "faces" / "index.json").read_text())
    images = [{k: e[k] for k in ("identity", "file", "mask")} for e in synth_index["images"]]
    for entry in images:
        entry["landmarks"] = _landmarks(12, 24) if entry["file"].endswith("00000.png") else None
    index = {"schema": "facetwin-faces/1", "size": 32, "margin": 0.2,
             "identities": [{"name": e["name"], "sources": []} for e in synth_index["identities"]], "images": images}
    (tmp_path / "faces" / "index.json").write_text(json.dumps(index))
    regions = load_faces(tmp_path / "faces")["ada"].regions.float() / 255
    first = regions[0, 0]
    assert float(first[12, 10]) > 0.9 and float(first[12, 22]) > 0.9 and float(first[24, 16]) > 0.9  # eyes, mouth
    assert float(first[3, 3]) == 0 and float(first[18, 16]) < 0.5  # corner and nose: no extra weight
    assert not regions[1:].any()  # no landmarks: an empty map, the loss falls back to the plain terms


def test_augment_moves_the_eye_and_mouth_map_with_the_target(dataset):
    ident = load_faces(dataset)["ada"]
    faces, masks, regions = ident.sample(3, torch.Generator().manual_seed(0))
    config = AugmentConfig(**{**NO_AUGMENT.__dict__, "flip": 1.0, "warp": 0.03})
    out = augment(faces, masks, torch.Generator().manual_seed(0), config, regions)
    assert torch.allclose(out.target_regions, (regions.float() / 255).flip(-1), atol=1e-5)  # flipped, not warped


def test_data_moves_to_a_device_as_uint8_and_samples_there(dataset):
    ident = load_faces(dataset)["ada"].to("cpu")  # the trainer's path; a CUDA device keeps the same dtypes
    sample = ident.sample(4, torch.Generator().manual_seed(0))
    assert all(t.dtype == torch.uint8 and t.device.type == "cpu" for t in sample)
    again = load_faces(dataset)["ada"].sample(4, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(sample, again))


@pytest.fixture(scope="module")
def faces_128(tmp_path_factory) -> Path:
    return synth.write_dataset(tmp_path_factory.mktemp("data128") / "faces", identities=2, images=3, size=128, seed=5,
                               progress=False)


@pytest.mark.parametrize("resolution", [128, 256])
def test_loading_and_every_augmentation_work_at_128_and_256_px(faces_128, resolution):
    """The residual family's sizes: faces rendered at 128 px load at 128 (and resized to 256), carry their eye/mouth
    maps at that size, and every augmentation (colour, affine, flip, warp, recolouring) keeps the shapes and the
    shared geometry of input and target."""
    loaded = load_faces(faces_128, resolution=resolution)
    ada = loaded["ada"]
    assert ada.faces.shape == (3, 3, resolution, resolution) and ada.regions.shape == (3, 1, resolution, resolution)
    assert ada.regions.any()  # the eye/mouth maps scale with the side
    faces, masks, regions = ada.sample(2, torch.Generator().manual_seed(0))
    everything = AugmentConfig(flip=1.0, face_color=1.0)  # the defaults' affine, colour jitter and warp, and more
    out = augment(faces, masks, torch.Generator().manual_seed(1), everything, regions)
    for tensor, channels in zip(out, (3, 3, 1, 1)):
        assert tensor.shape == (2, channels, resolution, resolution) and tensor.dtype == torch.float32
        assert float(tensor.min()) >= 0 and float(tensor.max()) <= 1
    # Flipped like the target: the target's mask matches the flipped source mask up to the light affine.
    flipped = (masks.float() / 255).flip(-1)
    assert float((out.target_mask - flipped).abs().mean()) < float((out.target_mask - masks.float() / 255).abs().mean())
    assert float((out.inputs - out.target).abs().mean()) > 0.005  # the warp and the recolouring: input only
    # The colour jitter's luma is computed on the device from scalars: the same numbers as a weighted channel sum.
    plain = AugmentConfig(**{**NO_AUGMENT.__dict__, "saturation": 0.5})
    saturated = augment(faces, masks, torch.Generator().manual_seed(2), plain)
    x = faces.float() / 255
    gray = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    scale = 1 + (torch.rand(2, 1, 1, 1, generator=torch.Generator().manual_seed(2)) * 2 - 1) * 0.5
    torch.testing.assert_close(saturated.target, (gray + (x - gray) * scale).clamp(0, 1), atol=1e-5, rtol=0)

"""Synthetic faces: determinism, identity vs pose separation, masks, and the on-disk dataset contract."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest

from facetwin.core.bundle import NAME_PATTERN
from facetwin.training import synth


@pytest.fixture(scope="module")
def pose() -> synth.Pose:
    return synth.test_poses(1, seed=5)[0]


def frontal(**changes) -> synth.Pose:
    base = synth.Pose(yaw=0.0, pitch=0.0, roll=0.0, mouth_open=0.0, smile=0.0, blink=0.0, light_azimuth=90.0,
                      light_elevation=60.0, light_intensity=0.6, ambient=0.4, background_a=(255, 0, 0),
                      background_b=(255, 0, 0), background_angle=0.0, shift_x=0.0, shift_y=0.0, scale=1.0)
    return dataclasses.replace(base, **changes)


def test_identity_names_and_determinism():
    names = [synth.make_identity(i).name for i in range(20)]
    assert names[:4] == ["ada", "ben", "cleo", "dev"]
    assert names[19] == "id19" and len(set(names)) == 20
    assert all(NAME_PATTERN.match(n) for n in names)
    assert synth.make_identity(3, seed=7) == synth.make_identity(3, seed=7)
    assert synth.make_identity(3, seed=7) != synth.make_identity(3, seed=8)
    assert {synth.make_identity(i).hair_style for i in range(5)} == set(synth.HAIR_STYLES)
    with pytest.raises(ValueError, match="index"):
        synth.make_identity(-1)
    with pytest.raises(ValueError, match="seed"):
        synth.make_identity(0, seed=-3)


def test_render_shapes_and_determinism(pose):
    ident = synth.make_identity(2)
    image, mask = synth.render(ident, pose, 48)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert mask.shape == (48, 48) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    assert 0.15 < (mask > 0).mean() < 0.7  # an aligned crop: the face is a large part, not all of it
    again, again_mask = synth.render(ident, pose, 48)
    assert image.tobytes() == again.tobytes() and mask.tobytes() == again_mask.tobytes()
    for size in (15, 513, 64.0):
        with pytest.raises(ValueError, match="size"):
            synth.render(ident, pose, size)


def test_image_is_rgb():
    image, mask = synth.render(synth.make_identity(0), frontal(), 32)
    assert tuple(image[0, 0]) == (255, 0, 0)  # pure red background stays red: no BGR swap
    assert mask[0, 0] == 0 and mask[16, 16] == 255  # background out, face centre in


def test_resolution_independent(pose):
    """Geometry is in crop units: a 128 px render, shrunk, matches the 64 px render."""
    ident = synth.make_identity(4)
    small = synth.render(ident, pose, 64)[0].astype(float)
    big = cv2.resize(synth.render(ident, pose, 128)[0], (64, 64), interpolation=cv2.INTER_AREA).astype(float)
    assert np.abs(small - big).mean() < 4.0


def test_identities_differ_under_the_same_pose(pose):
    renders = [synth.render(synth.make_identity(i), pose, 64) for i in range(8)]
    for i in range(len(renders)):
        for j in range(i + 1, len(renders)):
            diff = np.abs(renders[i][0].astype(float) - renders[j][0].astype(float))
            face = (renders[i][1] > 0) | (renders[j][1] > 0)
            assert diff[face].mean() > 12, f"identities {i} and {j} look alike"


def test_pose_and_expression_change_the_image():
    ident = synth.make_identity(1)
    base, base_mask = synth.render(ident, frontal(), 64)

    def changed(**kw) -> int:  # pixels that visibly changed
        diff = np.abs(synth.render(ident, frontal(**kw), 64)[0].astype(int) - base).max(axis=2)
        return int((diff > 20).sum())

    for change in ({"yaw": 20.0}, {"pitch": -12.0}, {"roll": 10.0}, {"mouth_open": 1.0}, {"smile": 1.0},
                   {"blink": 1.0}, {"light_azimuth": 0.0}):
        assert changed(**change) >= 10, change
    # Yaw moves the face sideways in the crop less than it turns it: the mask centre stays near the middle.
    turned_mask = synth.render(ident, frontal(yaw=25.0), 64)[1]
    cols = np.nonzero(turned_mask)[1]
    assert abs(cols.mean() - np.nonzero(base_mask)[1].mean()) < 6


def test_face_mask_excludes_hair(pose):
    ident = synth.make_identity(0)
    areas = {style: (synth.render(dataclasses.replace(ident, hair_style=style), pose, 64)[1] > 0).sum()
             for style in ("bald", "short", "fringe")}
    assert areas["bald"] > areas["short"] > areas["fringe"]


def test_test_poses_are_held_out():
    poses = synth.test_poses(5, seed=0)
    assert poses == synth.test_poses(5, seed=0)
    assert poses != synth.test_poses(5, seed=1)
    index = synth.dataset_index(2, 5, 32, seed=0)
    training = {json.dumps(e["pose"], sort_keys=True) for e in index["images"]}
    assert not training & {json.dumps(dataclasses.asdict(p), sort_keys=True) for p in poses}
    for p in synth.test_poses(50, seed=3):
        assert abs(p.yaw) <= 25 and abs(p.pitch) <= 15 and abs(p.roll) <= 12
        assert 0 <= p.mouth_open <= 1 and 0 <= p.smile <= 1 and 0 <= p.blink <= 1


def test_write_dataset(tmp_path):
    out = synth.write_dataset(tmp_path / "data", identities=2, images=3, size=32, seed=4, progress=False)
    index = synth.load_index(out)
    assert index["schema"] == "facetwin-synth/1" and index["size"] == 32 and index["seed"] == 4
    assert [e["name"] for e in index["identities"]] == ["ada", "ben"]
    assert len(index["images"]) == 6
    poses = {e["identity"]: [] for e in index["images"]}
    for entry in index["images"]:
        poses[entry["identity"]].append(entry["pose"])
        # Ground truth re-renders from index.json alone, byte for byte, and the PNGs on disk are RGB.
        ident = synth.identity_from_dict(next(i for i in index["identities"] if i["name"] == entry["identity"]))
        image, mask = synth.render(ident, synth.pose_from_dict(entry["pose"]), 32)
        on_disk = cv2.cvtColor(cv2.imread(str(out / entry["file"])), cv2.COLOR_BGR2RGB)
        assert np.array_equal(on_disk, image)
        assert np.array_equal(cv2.imread(str(out / entry["mask"]), cv2.IMREAD_GRAYSCALE), mask)
        assert entry["file"] == f"{entry['identity']}/{len(poses[entry['identity']]) - 1:05d}.png"
    assert poses["ada"] != poses["ben"]  # each identity has its own poses
    assert synth.identity_from_dict(index["identities"][1]) == synth.make_identity(1, seed=4)


def test_write_dataset_rerun_is_a_no_op_and_repairs(tmp_path):
    out = synth.write_dataset(tmp_path, identities=2, images=2, size=16, progress=False)
    files = sorted(p for p in out.rglob("*.png"))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    index_bytes = (out / "index.json").read_bytes()
    synth.write_dataset(tmp_path, identities=2, images=2, size=16, progress=False)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before  # nothing rewritten
    files[0].unlink()
    synth.write_dataset(tmp_path, identities=2, images=2, size=16, progress=False)
    assert files[0].read_bytes() == before[files[0]][0]  # a missing file is re-rendered identically
    assert (out / "index.json").read_bytes() == index_bytes


def test_crash_never_leaves_an_index_over_missing_files(tmp_path, monkeypatch):
    synth.write_dataset(tmp_path, identities=2, images=1, size=16, progress=False)
    calls = []

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("simulated crash")
        return real_render(*args, **kwargs)

    real_render = synth.render
    monkeypatch.setattr(synth, "render", failing_render)
    with pytest.raises(RuntimeError, match="simulated crash"):
        synth.write_dataset(tmp_path, identities=3, images=2, size=16, progress=False)
    assert not (tmp_path / "index.json").exists()  # the old index is gone, the new one never written
    monkeypatch.setattr(synth, "render", real_render)
    index = synth.load_index(synth.write_dataset(tmp_path, identities=3, images=2, size=16, progress=False))
    assert all((tmp_path / e["file"]).is_file() and (tmp_path / e["mask"]).is_file() for e in index["images"])


def test_parallel_workers_write_the_same_bytes(tmp_path):
    args = {"identities": 2, "images": synth.PARALLEL_MIN_IMAGES // 2, "size": 16, "seed": 3, "progress": False}
    serial = synth.write_dataset(tmp_path / "serial", workers=1, **args)
    parallel = synth.write_dataset(tmp_path / "parallel", workers=2, **args)
    files = sorted(p.relative_to(serial) for p in serial.rglob("*") if p.is_file())
    assert len(files) == 2 * synth.PARALLEL_MIN_IMAGES + 1
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*") if p.is_file())
    assert all((serial / f).read_bytes() == (parallel / f).read_bytes() for f in files)


@pytest.mark.parametrize("kwargs, message", [
    ({"identities": 1, "images": 1}, "identities"),
    ({"identities": 2, "images": 0}, "images"),
    ({"identities": 2, "images": 1, "size": 8}, "size"),
    ({"identities": 2, "images": 1, "size": 1024}, "size"),
    ({"identities": 2, "images": 1, "seed": -1}, "seed"),
    ({"identities": 2, "images": 1, "workers": 0}, "workers"),
])
def test_write_dataset_validates(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        synth.write_dataset(tmp_path, progress=False, **kwargs)
    assert not any(tmp_path.iterdir())


def test_load_index_and_dicts_reject_bad_input(tmp_path):
    with pytest.raises(ValueError, match="index.json is missing"):
        synth.load_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(ValueError, match="schema"):
        synth.load_index(tmp_path)
    good = dataclasses.asdict(synth.test_poses(1, 0)[0])
    assert synth.pose_from_dict(json.loads(json.dumps(good))) == synth.test_poses(1, 0)[0]
    with pytest.raises(ValueError, match="missing"):
        synth.pose_from_dict({k: v for k, v in good.items() if k != "yaw"})
    with pytest.raises(ValueError, match="RGB"):
        synth.pose_from_dict({**good, "background_a": [300, 0, 0]})
    with pytest.raises(ValueError, match="yaw must be a float"):
        synth.pose_from_dict({**good, "yaw": "left"})
    entry = {"name": "ada", "params": {**dataclasses.asdict(synth.make_identity(0)), "hair_style": "mohawk"}}
    del entry["params"]["name"]
    with pytest.raises(ValueError, match="hair_style"):
        synth.identity_from_dict(entry)
    entry["params"]["hair_style"] = "short"
    with pytest.raises(ValueError, match="identity name"):
        synth.identity_from_dict({**entry, "name": "../escape"})

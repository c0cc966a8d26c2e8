"""Ground-truth swap scoring: SSIM itself, and the pipeline run on a tiny hand-built bundle (no training)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from facetwin.server.bundle import Manifest, TensorSpec, sha256_file, write_manifest
from facetwin.training import synth
from facetwin.training.evaluate import ssim, swap_grid, synthetic_swap_score

RES = 32


def passthrough_graph(res: int) -> onnx.ModelProto:
    """face = input unchanged, mask = 1 everywhere: a 'model' that swaps nothing."""
    spec = ["B", 3, res, res]
    nodes = [
        helper.make_node("Identity", ["input"], ["face"]),
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["mean", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "one"], ["mask"]),
    ]
    graph = helper.make_graph(
        nodes, "passthrough",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, spec)],
        [helper.make_tensor_value_info("face", TensorProto.FLOAT, spec),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", 1, res, res])],
        initializer=[helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
                     helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def make_bundle(root: Path, identities: int = 3, seed: int = 0, data: dict | None = None) -> Path:
    names = [synth.make_identity(i, seed).name for i in range(identities)]
    root.mkdir(parents=True, exist_ok=True)
    targets = {}
    for name in names:
        targets[name] = f"target_{name}.onnx"
        onnx.save(passthrough_graph(RES), str(root / targets[name]))
    manifest = Manifest(
        variant="ae", resolution=RES, identities=tuple(names),
        input=TensorSpec("input", ("B", 3, RES, RES)),
        output_face=TensorSpec("face", ("B", 3, RES, RES)),
        output_mask=TensorSpec("mask", ("B", 1, RES, RES)),
        targets=targets, files={f: sha256_file(root / f) for f in targets.values()},
        model_config={}, training_config={"data": data or {"kind": "synth", "seed": seed, "identities": names}},
    )
    write_manifest(root, manifest)
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def test_ssim_properties():
    rng = np.random.default_rng(0)
    image = synth.render(synth.make_identity(0), synth.test_poses(1, 0)[0], 32)[0]
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    noisy = np.clip(image + rng.normal(0, 20, image.shape), 0, 255)
    noisier = np.clip(image + rng.normal(0, 60, image.shape), 0, 255)
    assert 1.0 > ssim(image, noisy) > ssim(image, noisier)
    assert ssim(image, noisy) == pytest.approx(ssim(noisy, image), abs=1e-12)
    assert ssim(image[..., 0], noisy[..., 0]) == pytest.approx(
        ssim(image[..., :1], noisy[..., :1]), abs=1e-12)  # HxW == HxWx1


def test_ssim_hand_checked_value():
    # Two flat images: variances and covariance vanish, only the luminance term remains:
    # (2*100*110 + C1) / (100^2 + 110^2 + C1) with C1 = (0.01*255)^2 = 6.5025.
    a, b = np.full((12, 12), 100.0), np.full((12, 12), 110.0)
    assert ssim(a, b) == pytest.approx((22000 + 6.5025) / (22100 + 6.5025), rel=1e-9)
    # A mask picks the part of the map it covers: left half equal, right half flat 100 vs 110.
    c = a.copy()
    c[:, 6:] = 110.0
    left = np.zeros((12, 12), np.uint8)
    left[:, :1] = 1  # far enough from the edge that the window never sees the right half
    assert ssim(a, c, left) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="empty"):
        ssim(a, c, np.zeros((12, 12)))
    with pytest.raises(ValueError, match="shape"):
        ssim(a, c[:, :6])


def test_score_of_a_model_that_swaps_nothing(bundle):
    result = synthetic_swap_score(bundle, count=4, seed=7)
    assert result["count"] == 4 and result["resolution"] == RES
    assert {(p["source"], p["target"]) for p in result["pairs"]} == {
        (a, b) for a in ("ada", "ben", "cleo") for b in ("ada", "ben", "cleo") if a != b}
    for pair in result["pairs"]:
        # The output is A's face, the truth is B's face under the same pose and background: similar crops,
        # clearly different faces.
        assert 0.2 < pair["ssim_face"] < 0.9
        assert 0.2 < pair["ssim"] < 0.9
        assert pair["l1"] > 0.02
    assert result["ssim"] == pytest.approx(np.mean([p["ssim"] for p in result["pairs"]]))


def test_perfect_oracle_scores_one(bundle):
    """Scoring the ground truth against itself (A->A through a pass-through graph renders A under the same held-out
    poses twice) gives exactly 1: poses, resolution, colour order and layout all line up."""
    result = synthetic_swap_score(bundle, count=3, seed=7, source="ben", target="ben")
    assert len(result["pairs"]) == 1
    assert result["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert result["ssim_face"] == pytest.approx(1.0, abs=1e-6)
    assert result["l1"] < 1e-6


def test_pair_selection_and_errors(bundle, tmp_path):
    only_source = synthetic_swap_score(bundle, count=1, source="ada")
    assert {(p["source"], p["target"]) for p in only_source["pairs"]} == {("ada", "ben"), ("ada", "cleo")}
    with pytest.raises(ValueError, match="not a synthetic identity"):
        synthetic_swap_score(bundle, count=1, target="zed")
    with pytest.raises(ValueError, match="not trained on synthetic faces"):
        synthetic_swap_score(make_bundle(tmp_path / "real", data={"kind": "folders"}), count=1)
    wrong = {"kind": "synth", "seed": 0, "identities": ["ada", "cleo", "ben"]}
    with pytest.raises(ValueError, match="cannot be reproduced"):
        synthetic_swap_score(make_bundle(tmp_path / "wrong", data=wrong), count=1)


def test_swap_grid(bundle, tmp_path):
    out = swap_grid(bundle, tmp_path / "grid.png", count=3, source="ada", target="cleo")
    grid = cv2.imread(str(out))
    assert grid is not None
    cell = RES * 3
    assert grid.shape[0] == 6 * (cell + 2) + 2  # A, A->B, true B, then B, B->A, true A
    assert grid.shape[1] > 3 * cell

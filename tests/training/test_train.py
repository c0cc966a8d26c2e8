"""The training loop, checkpoints (atomic, pickle-free), resume, and the dry run."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import tempfile
import threading
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch import nn

from facetwin.core.model import FaceSwapAutoencoder, ModelConfig
from facetwin.training import synth
from facetwin.training.amp import autocast_dtype, cpu_has_bf16
from facetwin.training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from facetwin.training.config import TrainConfig, learning_rate, preset_model
from facetwin.training.data import AugmentConfig, DatasetError, load_faces, to_device
from facetwin.training.run_folder import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    STOPPED_AT_INTERRUPT,
    STOPPED_AT_STEPS,
    STOPPED_AT_TIME_BUDGET,
    SUMMARY_NAME,
    read_summary,
)
from facetwin.training.step import make_trainer, sample_batches, train_step, update_average
from facetwin.training.train import TrainingDiverged, dry_run, train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synth.write_dataset(tmp_path_factory.mktemp("data") / "faces", identities=2, images=8, size=32, seed=0,
                               progress=False)


def tiny(data: Path, out: Path, **overrides) -> TrainConfig:
    return TrainConfig.from_preset("tiny", data, out, **overrides)


def test_train_writes_a_loadable_checkpoint_and_config(data, tmp_path):
    ckpt = train(tiny(data, tmp_path / "run", steps=6, checkpoint_every=4), progress=False)
    assert ckpt == tmp_path / "run" / CHECKPOINT_NAME
    checkpoint = load_checkpoint(ckpt)
    assert checkpoint["step"] == 6
    assert set(checkpoint) >= {"config", "model", "optimizer", "step"}
    assert checkpoint["train_config"].model.identities == ("ada", "ben")
    assert checkpoint["data"] == {"kind": "synth", "seed": 0, "size": 32, "identities": ["ada", "ben"]}
    config = json.loads((tmp_path / "run" / CONFIG_NAME).read_text())
    assert config["preset"] == "tiny" and config["model"]["identities"] == ["ada", "ben"]
    assert config["betas"] == [0.5, 0.999]
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]  # no temp files left
    model = model_from_checkpoint(checkpoint)
    assert not model.training


def test_each_call_leaves_a_summary_of_what_it_trained_beside_the_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    ckpt = train(tiny(data, run, steps=6, checkpoint_every=4, log_every=2), progress=False)
    summary = read_summary(run)
    assert (summary.checkpoint, summary.step_start, summary.step_end, summary.steps) == (str(ckpt), 0, 6, 6)
    assert summary.stopped == STOPPED_AT_STEPS and summary.steps_trained == 6 and summary.seconds > 0
    assert (summary.variant, summary.precision, summary.world_size) == ("ae", "float32", 1)
    assert {"total", "grad_norm", "l1"} <= set(summary.losses) and all(v >= 0 for v in summary.losses.values())
    written = json.loads((run / SUMMARY_NAME).read_text())  # the file spells out what readers derive
    assert written["steps_trained"] == 6 and written["steps_per_second"] == pytest.approx(6 / summary.seconds, rel=1e-3)

    train(tiny(data, run, steps=10, checkpoint_every=4), progress=False, resume=True)
    resumed = read_summary(run)
    assert (resumed.step_start, resumed.step_end, resumed.steps_trained) == (6, 10, 4)
    assert resumed.step_end == load_checkpoint(ckpt)["step"]
    train(tiny(data, run, steps=10), progress=False, resume=True)  # nothing left to train
    finished = read_summary(run)
    assert (finished.step_start, finished.step_end, finished.seconds, finished.stopped) == (10, 10, 0.0, "steps")
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_run_that_diverges_stops_with_the_reason_and_keeps_its_last_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    first = train(tiny(data, run, steps=4, checkpoint_every=4), progress=False)
    before = first.read_bytes()
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+ .* lower --lr .*checkpoint at .* is kept"):
        train(tiny(data, run, steps=40, checkpoint_every=1, lr=1e9), progress=False, resume=True)
    assert first.read_bytes() == before  # no checkpoint of blown-up weights replaced it
    with pytest.raises(ValueError, match="lr must be a positive, finite"):
        train(tiny(data, tmp_path / "other", lr=float("inf")), progress=False)


@pytest.mark.parametrize(("variant", "lr", "reason"), [
    ("ae", 1e6, "the model's outputs are no longer finite numbers"),  # NaN masks, weights still finite
    ("ae", 1.0, "the loss rose from"),  # a finite loss, 1e11 times its first value
    ("vae", 10.0, "the loss rose from"),
    ("cyclegan", 1e4, "the loss rose from"),
])
def test_a_loss_that_explodes_or_nan_outputs_stop_the_run_before_its_checkpoint_is_replaced(data, tmp_path, variant,
                                                                                             lr, reason):
    run = tmp_path / "run"
    first = train(tiny(data, run, steps=2, variant=variant), progress=False)
    before = first.read_bytes()
    with pytest.raises(TrainingDiverged, match=f"diverged at step \\d+ \\({reason}.* lower --lr .*checkpoint at .* "
                       "is kept as it was"):
        train(tiny(data, run, steps=120, checkpoint_every=40, variant=variant, lr=lr), progress=False, resume=True)
    assert first.read_bytes() == before


@pytest.mark.parametrize("part", ["model", "ema"])
def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_refused_naming_the_key(data, tmp_path, part):
    run = tmp_path / "run"
    ckpt = train(tiny(data, run, steps=2), progress=False)
    saved = torch.load(ckpt, weights_only=True)
    removed = sorted(saved[part])[0]
    del saved[part][removed]
    torch.save(saved, ckpt)
    with pytest.raises(CheckpointError, match=f"do not fit its model config .*{removed}"):
        train(tiny(data, run, steps=4), progress=False, resume=True)
    if part == "ema":  # what export reads: the averaged weights
        with pytest.raises(CheckpointError, match=f"do not fit its model config .*{removed}"):
            model_from_checkpoint(load_checkpoint(ckpt))


def test_the_summary_of_a_call_that_did_not_finish_says_so_and_matches_its_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "previews").write_text("a file where the preview folder goes")  # the step-3 preview fails
    with pytest.raises(FileExistsError):
        train(tiny(data, run, steps=8, checkpoint_every=2, preview_every=3), progress=False)
    summary = read_summary(run)
    assert summary.stopped is None  # neither the steps nor the time budget ended it
    assert (summary.step_start, summary.step_end) == (0, 2) == (0, load_checkpoint(run / CHECKPOINT_NAME)["step"])


def test_the_augmentation_is_picked_for_the_data_and_saved_with_the_weights(data, tmp_path):
    train(tiny(data, tmp_path / "run", steps=2), progress=False)
    config = json.loads((tmp_path / "run" / CONFIG_NAME).read_text())
    assert config["augment"] == dataclasses.asdict(AugmentConfig.synthetic())  # synthetic faces: no geometry
    assert TrainConfig.from_dict(config).augment == AugmentConfig.synthetic()
    chosen = AugmentConfig.footage()
    train(tiny(data, tmp_path / "chosen", steps=2, augment=chosen), progress=False)
    assert load_checkpoint(tmp_path / "chosen" / CHECKPOINT_NAME)["train_config"].augment == chosen
    warped = dataclasses.replace(AugmentConfig.footage(), warp=0.03)  # e.g. a run from before footage() lost it
    train(tiny(data, tmp_path / "kept", steps=2, augment=warped), progress=False)
    train(tiny(data, tmp_path / "kept", steps=4), progress=False, resume=True)  # no augmentation given: its own
    assert load_checkpoint(tmp_path / "kept" / CHECKPOINT_NAME)["train_config"].augment == warped
    train(tiny(data, tmp_path / "kept", steps=6, augment=chosen), progress=False, resume=True)  # one given: that
    assert load_checkpoint(tmp_path / "kept" / CHECKPOINT_NAME)["train_config"].augment == chosen


def test_training_lowers_the_reconstruction_error(data, tmp_path):
    cfg = tiny(data, tmp_path / "run", steps=150)
    faces = load_faces(data, resolution=32)
    torch.manual_seed(cfg.seed)  # train() seeds the same way, so this is the model it starts from
    before = FaceSwapAutoencoder(ModelConfig.tiny(["ada", "ben"])).eval()

    def error(model: FaceSwapAutoencoder) -> float:
        with torch.no_grad():
            return sum(float((model(f.faces.float() / 255, n)[0] - f.faces.float() / 255).abs().mean())
                       for n, f in faces.items()) / len(faces)

    trained = model_from_checkpoint(load_checkpoint(train(cfg, progress=False)))
    assert error(trained) < 0.75 * error(before)


def test_resume_continues_exactly_where_an_uninterrupted_run_would_be(data, tmp_path):
    constant = {"lr_final_fraction": 1.0, "warmup_steps": 0, "checkpoint_every": 100}  # schedule independent of steps
    whole = train(tiny(data, tmp_path / "whole", steps=8, **constant), progress=False)
    train(tiny(data, tmp_path / "parts", steps=4, **constant), progress=False)
    parts = train(tiny(data, tmp_path / "parts", steps=8, **constant), progress=False, resume=True)
    a, b = load_checkpoint(whole), load_checkpoint(parts)
    assert a["step"] == b["step"] == 8
    for part in ("model", "ema"):  # the weights' moving average resumes too
        for key, tensor in a[part].items():
            assert torch.equal(tensor, b[part][key]), (part, key)


def test_the_moving_average_of_the_weights_is_what_gets_exported(data, tmp_path):
    averaged = load_checkpoint(train(tiny(data, tmp_path / "on", steps=30), progress=False))
    assert averaged["ema"].keys() == averaged["model"].keys()
    assert any(not torch.equal(averaged["ema"][k], v) for k, v in averaged["model"].items())
    for key, tensor in model_from_checkpoint(averaged).state_dict().items():
        assert torch.equal(tensor, averaged["ema"][key]), key
    plain = load_checkpoint(train(tiny(data, tmp_path / "off", steps=30, ema_decay=0.0), progress=False))
    assert "ema" not in plain
    for key, tensor in model_from_checkpoint(plain).state_dict().items():
        assert torch.equal(tensor, plain["model"][key]), key
    for key, tensor in plain["model"].items():  # the average only watches: training itself is the same
        assert torch.equal(tensor, averaged["model"][key]), key
    with pytest.raises(ValueError, match="ema_decay"):
        train(tiny(data, tmp_path / "bad", ema_decay=1.0), progress=False)


def test_a_gradient_above_grad_clip_is_scaled_down_to_it_and_its_norm_reported(data, tmp_path):
    faces = load_faces(data, resolution=32)

    def one_step(grad_clip: float) -> tuple[float, float, dict[str, torch.Tensor]]:
        cfg = tiny(data, tmp_path, grad_clip=grad_clip, model=preset_model("tiny", ["ada", "ben"]),
                   augment=AugmentConfig.synthetic())
        t = make_trainer(cfg, ["ada", "ben"], torch.device("cpu"))
        generator = torch.Generator().manual_seed(0)
        terms = train_step(t, sample_batches(t, faces, generator), 0, generator)
        applied = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in t.model.parameters()]))
        return float(terms["grad_norm"]), float(applied), t.model.state_dict()

    norm, applied, free = one_step(0.0)  # 0: no clipping, the step uses the whole gradient
    assert norm > 0.01 and applied == pytest.approx(norm, rel=1e-5)
    unclipped_norm, applied, clipped = one_step(grad_clip=norm / 10)
    assert unclipped_norm == pytest.approx(norm, rel=1e-5)  # the norm before clipping is what gets reported
    assert applied == pytest.approx(norm / 10, rel=1e-3)  # the optimizer stepped on a gradient of norm grad_clip
    assert any(not torch.equal(tensor, clipped[key]) for key, tensor in free.items())
    assert TrainConfig("d", "o").grad_clip == 2.0  # on by default
    with pytest.raises(ValueError, match="grad_clip"):
        train(tiny(data, tmp_path / "bad", grad_clip=-1.0), progress=False)
    assert not (tmp_path / "bad").exists()


def test_update_average_follows_the_weights_fast_early_and_slowly_later():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    average = copy.deepcopy(model)
    start = average.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    update_average(average, model, decay=0.999, step=0)  # early: d = min(0.999, 1 / 10) = 0.1
    torch.testing.assert_close(average.weight, start + 0.9)
    update_average(average, model, decay=0.5, step=10_000)  # later: d = the decay
    torch.testing.assert_close(average.weight, start + 0.95)
    torch.testing.assert_close(average.bias, model.bias)  # equal weights stay equal


def test_mixed_precision_on_the_cpu(data, tmp_path):
    cpu = torch.device("cpu")
    assert autocast_dtype("off", cpu) is None
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_bf16() else None)
    assert autocast_dtype("auto", cpu, "vae-gan") is None and autocast_dtype("bf16", cpu, "vae-gan") == torch.bfloat16
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("fp16", cpu) == torch.float16  # runs (slowly) so the CUDA recipe is checked here
    assert TrainConfig("d", "o").amp == "auto" and TrainConfig.from_preset("tiny", "d", "o").amp == "off"
    half = load_checkpoint(train(tiny(data, tmp_path / "bf16", steps=20, amp="bf16"), progress=False))
    full = load_checkpoint(train(tiny(data, tmp_path / "fp32", steps=20), progress=False))
    for key, tensor in half["model"].items():  # autocast computes in bf16 but keeps float32 weights
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all(), key
    assert any(not torch.equal(t, full["model"][k]) for k, t in half["model"].items())  # bf16 really ran
    assert "scaler" not in half  # only fp16 scales its loss


def test_an_fp16_run_checkpoints_its_grad_scaler_and_resumes_exactly(data, tmp_path):
    """fp16 is the recipe for GPUs without bf16: autocast plus a GradScaler whose state (the loss scale, and how
    many steps since it last grew) is part of the run. CPU autocast runs the same code path as CUDA's."""
    fp16 = {"lr_final_fraction": 1.0, "warmup_steps": 0, "checkpoint_every": 100, "amp": "fp16",
            "variant": "vae-gan"}  # the critic's optimizer steps through the same scaler
    whole = load_checkpoint(train(tiny(data, tmp_path / "whole", steps=6, **fp16), progress=False))
    halfway = load_checkpoint(train(tiny(data, tmp_path / "parts", steps=3, **fp16), progress=False))
    parts = load_checkpoint(train(tiny(data, tmp_path / "parts", steps=6, **fp16), progress=False, resume=True))
    assert whole["scaler"] == parts["scaler"] != halfway["scaler"]  # the loss scale resumes where it was
    assert whole["scaler"]["scale"] <= 2.0**16 and 0 < whole["scaler"]["_growth_tracker"] <= 6
    for key in ("model", "ema", "critics"):
        for name, tensor in whole[key].items():
            assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all(), (key, name)
            assert torch.equal(tensor, parts[key][name]), (key, name)
    plain = load_checkpoint(train(tiny(data, tmp_path / "fp32", steps=6, **(fp16 | {"amp": "off"})), progress=False))
    assert any(not torch.equal(t, plain["model"][k]) for k, t in whole["model"].items())  # fp16 really ran


def test_to_device_keeps_the_values_and_leaves_device_tensors_alone():
    numbers = torch.rand(4, 3, generator=torch.Generator().manual_seed(0))
    moved = to_device(numbers, torch.device("cpu"))
    assert torch.equal(moved, numbers) and moved.device.type == "cpu"
    if torch.cuda.is_available():
        on_gpu = to_device(numbers, torch.device("cuda"))
        assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), numbers)
        assert to_device(on_gpu, torch.device("cuda")) is on_gpu


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_sampling_and_augmenting_a_step_never_makes_the_cpu_wait_for_the_gpu(data, tmp_path):
    """The input pipeline draws its random numbers on the CPU; each copy to the GPU must be queued, not waited for
    (torch's sync debug mode raises on any synchronising CUDA call), or the GPU idles while the CPU prepares."""
    device = torch.device("cuda")
    cfg = tiny(data, tmp_path / "run", device="cuda", augment=AugmentConfig(face_color=0.5),  # every random draw
               loss=dataclasses.replace(TrainConfig.from_preset("tiny", data, tmp_path).loss, eyes_mouth=1.0))
    cfg = dataclasses.replace(cfg, model=preset_model("tiny", ["ada", "ben"]))
    trainer = make_trainer(cfg, ["ada", "ben"], device)
    faces = {name: ident.to(device) for name, ident in load_faces(data).items()}
    generator = torch.Generator().manual_seed(0)
    sample_batches(trainer, faces, generator)  # first use: allocator and kernel set-up may synchronise
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = sample_batches(trainer, faces, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(batch.inputs.device.type == "cuda" for batch in batches)
    assert all(torch.isfinite(batch.inputs).all() for batch in batches)
    native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)  # Ampere on; older GPUs only emulate it
    assert autocast_dtype("auto", device) == (torch.bfloat16 if native_bf16 else None)


def test_resume_of_a_finished_run_is_a_no_op(data, tmp_path):
    ckpt = train(tiny(data, tmp_path / "run", steps=3), progress=False)
    before = ckpt.stat().st_mtime_ns
    assert train(tiny(data, tmp_path / "run", steps=3), progress=False, resume=True) == ckpt
    assert ckpt.stat().st_mtime_ns == before


def test_an_existing_checkpoint_is_not_overwritten_without_resume(data, tmp_path):
    train(tiny(data, tmp_path / "run", steps=2), progress=False)
    with pytest.raises(CheckpointError, match="--resume"):
        train(tiny(data, tmp_path / "run", steps=2), progress=False)


def test_resume_refuses_an_incompatible_run(data, tmp_path):
    train(tiny(data, tmp_path / "run", steps=2), progress=False)
    with pytest.raises(CheckpointError, match="trained at 32 px"):
        train(TrainConfig.from_preset("demo", data, tmp_path / "run", steps=4), progress=False, resume=True)
    three = synth.write_dataset(tmp_path / "three", identities=3, images=2, size=32, progress=False)
    with pytest.raises(CheckpointError, match="cleo"):
        train(tiny(three, tmp_path / "run", steps=4), progress=False, resume=True)


def test_a_run_of_an_older_preset_model_names_what_changed_and_stays_intact(data, tmp_path):
    """A preset's model can change between releases (the demo model gained a shared decoder trunk): resuming a run
    of the older model says which fields differ and what to do, and leaves the checkpoint as it was."""
    older = dataclasses.replace(ModelConfig.tiny(["ada", "ben"]), shared_upscales=1)
    ckpt = train(tiny(data, tmp_path / "run", steps=2, model=older), progress=False)
    before = ckpt.read_bytes()
    with pytest.raises(CheckpointError, match=r"older model of preset 'tiny' \(shared_upscales 1 -> 0\): delete"):
        train(tiny(data, tmp_path / "run", steps=4), progress=False, resume=True)
    assert ckpt.read_bytes() == before


def test_load_checkpoint_rejects_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CHECKPOINT_NAME).write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"is a run folder: pass its checkpoint, {tmp_path / 'run' / CHECKPOINT_NAME}"):
        load_checkpoint(tmp_path / "run")
    with pytest.raises(CheckpointError, match="is truncated, damaged or another program's file"):
        load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file")
    with pytest.raises(CheckpointError, match="not a facetwin checkpoint"):
        load_checkpoint(garbage)
    pickled = tmp_path / "pickled.pt"
    torch.save({"config": Namespace(evil=True), "model": {}, "optimizer": {}, "step": 0}, pickled)
    with pytest.raises(CheckpointError, match="not a facetwin checkpoint"):  # weights_only=True refuses arbitrary classes
        load_checkpoint(pickled)
    partial = tmp_path / "partial.pt"
    torch.save({"model": {}}, partial)
    with pytest.raises(CheckpointError, match="needs config, model, optimizer, step"):
        load_checkpoint(partial)


def test_missing_data_is_a_dataset_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        train(tiny(tmp_path / "nowhere", tmp_path / "run", steps=1), progress=False)
    assert not (tmp_path / "run").exists()


def test_learning_rate_warms_up_then_decays():
    cfg = TrainConfig("d", "o", steps=100, lr=1e-3, warmup_steps=10, lr_final_fraction=0.1)
    assert learning_rate(cfg, 0) == pytest.approx(1e-4)
    assert learning_rate(cfg, 9) == pytest.approx(1e-3)
    assert learning_rate(cfg, 10) == pytest.approx(1e-3)
    assert learning_rate(cfg, 99) == pytest.approx(1e-4)
    rates = [learning_rate(cfg, s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_config_roundtrip_and_preset_overrides():
    cfg = TrainConfig.from_preset("tiny", "d", "o", steps=7, lr=None)
    assert cfg.steps == 7 and cfg.lr == TrainConfig.from_preset("tiny", "d", "o").lr  # None keeps the preset's
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="preset"):
        TrainConfig.from_preset("huge", "d", "o")
    with pytest.raises(ValueError, match="at least 1"):
        train(TrainConfig("d", "o", steps=0), progress=False)


def test_the_full_preset_is_the_original_model_at_a_gentler_learning_rate():
    full, demo = TrainConfig.from_preset("full", "d", "o"), TrainConfig.from_preset("demo", "d", "o")
    assert preset_model("full", ["ada", "ben"]) == ModelConfig.original(["ada", "ben"])
    assert preset_model("full", ["ada", "ben"], "vae").variant == "vae"
    # The demo model shares its decoders' first two Upscales; cyclegan's two generators share nothing.
    assert preset_model("demo", ["ada", "ben"], "vae").shared_upscales == 2
    assert preset_model("demo", ["ada", "ben"], "cyclegan").shared_upscales == 0
    assert full.batch_size == 4 * demo.batch_size and full.lr < demo.lr  # lr 1e-3 diverged on the original model
    assert TrainConfig.from_dict(json.loads(json.dumps(full.to_dict()))) == full


def test_the_128_and_256_px_presets_train_the_residual_family(tmp_path):
    """cpu-128 trains the demo's recipe on the residual family at 128 px; gpu-128 and gpu-256 the full preset's on the
    reference-sized models, at larger batches. One real cpu-128 step on faces rendered at 128 px."""
    names = ["ada", "ben"]
    for preset, resolution in (("cpu-128", 128), ("gpu-128", 128), ("gpu-256", 256)):
        model = preset_model(preset, names)
        assert (model.resolution, model.bottleneck_side, model.residual_blocks) == (resolution, 8, 1), preset
    gpu, full = TrainConfig.from_preset("gpu-128", "d", "o"), TrainConfig.from_preset("full", "d", "o")
    assert (gpu.lr, gpu.grad_clip) == (full.lr, full.grad_clip) and gpu.batch_size > full.batch_size
    assert TrainConfig.from_preset("cpu-128", "d", "o").batch_size == TrainConfig.from_preset("demo", "d", "o").batch_size
    data = synth.write_dataset(tmp_path / "faces", identities=2, images=2, size=128, seed=0, progress=False)
    cfg = TrainConfig.from_preset("cpu-128", data, tmp_path / "run", steps=1, threads=1, tensorboard=False)
    checkpoint = load_checkpoint(train(cfg, progress=False))
    assert checkpoint["train_config"].model == preset_model("cpu-128", names) and checkpoint["step"] == 1
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


def test_dry_run_takes_seconds_and_leaves_nothing(tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("facetwin-dry-*"))
    summary = dry_run(steps=3)
    assert summary["steps"] == 3 and summary["identities"] == ["ada", "ben"] and summary["checkpoint"] is None
    assert summary["seconds"] < 30
    assert set(Path(tempfile.gettempdir()).glob("facetwin-dry-*")) == before
    kept = dry_run(tmp_path / "run", steps=2)
    assert Path(kept["checkpoint"]).is_file()


def test_a_checkpoint_from_before_the_variants_still_loads_and_resumes(data, tmp_path):
    """Older checkpoints lack the variant/amp/tensorboard/preview fields and the newer loss weights."""
    ckpt = train(tiny(data, tmp_path / "run", steps=2, tensorboard=False), progress=False)
    payload = torch.load(ckpt, weights_only=True)
    for key in ("variant", "amp", "tensorboard", "log_every", "preview_every"):
        del payload["config"][key]
    for key in ("eyes_mouth", "kl", "gan", "mixup_alpha", "cycle", "identity"):
        del payload["config"]["loss"][key]
    del payload["config"]["model"]["discriminator_widths"]
    del payload["world_size"]
    torch.save(payload, ckpt)
    loaded = load_checkpoint(ckpt)
    assert loaded["train_config"].variant == "ae" and loaded["train_config"].model == ModelConfig.tiny(["ada", "ben"])
    resumed = train(tiny(data, tmp_path / "run", steps=4, tensorboard=False), progress=False, resume=True)
    assert load_checkpoint(resumed)["step"] == 4


def test_a_time_budget_stops_early_with_a_checkpoint_and_resume_finishes(data, tmp_path):
    # A budget far below one step's time: the run stops after its first step, checkpointed; resume goes on to steps.
    ckpt = train(tiny(data, tmp_path / "run", steps=50, checkpoint_every=100, max_seconds=1e-9), progress=False)
    assert load_checkpoint(ckpt)["step"] == 1
    summary = read_summary(tmp_path / "run")
    assert summary.stopped == STOPPED_AT_TIME_BUDGET and summary.step_end == 1 and summary.steps == 50
    finished = train(tiny(data, tmp_path / "run", steps=50, checkpoint_every=100), progress=False, resume=True)
    assert load_checkpoint(finished)["step"] == 50
    with pytest.raises(ValueError, match="max_seconds"):
        train(tiny(data, tmp_path / "bad", max_seconds=-1), progress=False)


def test_ctrl_c_finishes_the_step_saves_it_and_resumes_from_it(data, tmp_path):
    run = tmp_path / "run"

    def press_ctrl_c() -> None:  # once the loop runs: its first summary is written as it starts
        deadline = time.monotonic() + 60
        while not (run / SUMMARY_NAME).is_file() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c)
    presser.start()
    callers = signal.getsignal(signal.SIGINT)  # ignored where the tests run in the background
    with pytest.raises(KeyboardInterrupt):
        train(tiny(data, run, steps=1_000_000, checkpoint_every=1_000_000, log_every=1), progress=False)
    presser.join()
    summary = read_summary(run)
    step = load_checkpoint(run / CHECKPOINT_NAME)["step"]
    assert summary.stopped == STOPPED_AT_INTERRUPT and 0 < step == summary.step_end < 1_000_000
    assert summary.checkpoint == str(run / CHECKPOINT_NAME)
    assert signal.getsignal(signal.SIGINT) is callers  # Ctrl-C is the caller's again
    train(tiny(data, run, steps=step + 2, checkpoint_every=1_000_000), progress=False, resume=True)
    assert read_summary(run).step_end == step + 2


def test_faces_smaller_than_the_model_are_refused_and_larger_ones_scaled_down(data, real_data, tmp_path):
    with pytest.raises(DatasetError, match=rf"^{data} holds 32 px faces; preset demo trains at 64 px: render again "
                       r"with facetwin-train synth --size 64, or choose a 32-px preset \(tiny\)$"):
        train(TrainConfig.from_preset("demo", data, tmp_path / "demo", steps=1), progress=False)
    with pytest.raises(DatasetError, match=r"holds 64 px faces; preset cpu-128 trains at 128 px: extract again with "
                       r"--size 128, or choose a 64-px preset \(demo, full\)$"):
        train(TrainConfig.from_preset("cpu-128", real_data, tmp_path / "128", steps=1), progress=False)
    assert not (tmp_path / "demo").exists() and not (tmp_path / "128").exists()
    checkpoint = load_checkpoint(train(tiny(real_data, tmp_path / "tiny", steps=1, tensorboard=False), progress=False))
    assert checkpoint["step"] == 1 and checkpoint["data"]["size"] == 64
    assert checkpoint["train_config"].model.resolution == 32

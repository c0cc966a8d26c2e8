"""Multi-process training as users start it: `torchrun --nproc_per_node 2` on the CPU (gloo backend, DDP)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from facetwin.training import synth
from facetwin.training.checkpoint import load_checkpoint
from facetwin.training.config import TrainConfig
from facetwin.training.run_folder import CHECKPOINT_NAME, CONFIG_NAME, SUMMARY_NAME, read_summary
from facetwin.training.train import train

pytestmark = pytest.mark.slow
ARGS = ["--preset", "tiny", "--steps", "3", "--batch-size", "2", "--threads", "1", "--variant", "vae-gan",
        "--preview-every", "3"]


def test_torchrun_with_two_processes_writes_one_checkpoint_from_rank_zero(tmp_path):
    data = synth.write_dataset(tmp_path / "data", identities=2, images=6, size=32, progress=False)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "facetwin.training.cli", "train", "--data", str(data), "--out", str(run), *ARGS],
        capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("checkpoint: ") == 1  # rank 0 reports; rank 1 stays quiet

    # Rank 0 alone wrote the run folder: one checkpoint, one config, one summary, one event file, the previews; no
    # temp files.
    files = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    assert [f for f in files if not f.startswith("events.out.tfevents.")] == [
        CHECKPOINT_NAME, CONFIG_NAME, "previews/step_000003.png", SUMMARY_NAME]
    assert len([f for f in files if f.startswith("events.out.tfevents.")]) == 1
    checkpoint = load_checkpoint(run / CHECKPOINT_NAME)
    assert checkpoint["step"] == 3 and checkpoint["world_size"] == 2 and "critics" in checkpoint
    summary = read_summary(run)
    assert (summary.world_size, summary.step_end, summary.stopped) == (2, 3, "steps") and summary.losses

    # The same flags in one process give the same config: the process count is not part of the run's recipe.
    single = TrainConfig.from_preset("tiny", data, tmp_path / "alone", steps=3, batch_size=2, threads=1,
                                     variant="vae-gan", preview_every=3)
    alone = load_checkpoint(train(single, progress=False))
    assert checkpoint["config"] == {**alone["config"], "out_dir": str(run)}
    assert alone["world_size"] == 1
    # Same initial weights, and rank 0 drew the single process's batches: only DDP averaging in rank 1's
    # gradients can make the weights differ.
    assert checkpoint["model"].keys() == alone["model"].keys()
    assert any(not torch.equal(checkpoint["model"][k], alone["model"][k]) for k in alone["model"])

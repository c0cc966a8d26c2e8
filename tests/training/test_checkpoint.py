"""A training process SIGKILLed while it writes a checkpoint: the last good checkpoint survives and the run resumes
from it (the half-written temp file is cleared)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from facetwin.training import synth
from facetwin.training.checkpoint import load_checkpoint
from facetwin.training.train import TrainConfig, train
from tests.subprocesses import command_env

STEPS, EVERY = 60, 10
TRAIN = """
import sys
from facetwin.training.train import TrainConfig, train
cfg = TrainConfig.from_preset("demo", sys.argv[1], sys.argv[2], steps={steps}, checkpoint_every={every},
                              tensorboard=False, batch_size=2, threads=1)
train(cfg, progress=False, resume=True)
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_resumes_from_the_last_good_one(tmp_path):
    data = synth.write_dataset(tmp_path / "data", identities=2, images=16, size=64, seed=0, progress=False)
    run = tmp_path / "run"
    checkpoint = run / "checkpoint.pt"
    # The demo model's checkpoint (weights, their average, Adam's moments: ~50 MB) takes a while to write and fsync.
    child = subprocess.Popen([sys.executable, "-c", TRAIN.format(steps=STEPS, every=EVERY), str(data), str(run)],
                             env=command_env(), stderr=subprocess.PIPE, text=True)
    caught = None
    try:
        deadline = time.monotonic() + 240
        while child.poll() is None and time.monotonic() < deadline:
            writing = list(run.glob(".checkpoint.pt.*.tmp")) if checkpoint.exists() else []
            if writing:  # a second (or later) checkpoint is being written: kill it mid-write
                child.send_signal(signal.SIGKILL)
                caught = writing[0]
                break
            time.sleep(0.0005)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    assert caught is not None, f"never saw a checkpoint being written: {child.stderr.read()[-2000:]}"
    assert child.returncode == -signal.SIGKILL
    assert caught.exists(), "the kill landed after the write finished"
    good = load_checkpoint(checkpoint)  # the previous checkpoint is whole
    assert good["step"] % EVERY == 0 and EVERY <= good["step"] < STEPS

    cfg = TrainConfig.from_preset("demo", data, run, steps=STEPS, checkpoint_every=EVERY, tensorboard=False,
                                  batch_size=2, threads=1)
    train(cfg, progress=False, resume=True)
    assert load_checkpoint(checkpoint)["step"] == STEPS
    assert not list(run.glob(".checkpoint.pt.*.tmp")), "the half-written temp file was left behind"

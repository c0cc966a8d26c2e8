"""ServerConfig: defaults < environment < flags, with clear errors."""

import os

import pytest

from facetwin.server.config import ServerConfig


def test_env_then_flags_override_defaults():
    env = {"FACETWIN_MAX_BATCH": "32", "FACETWIN_MODEL_DIR": "/srv/models", "FACETWIN_REFLECTION": "false"}
    config = ServerConfig.from_env(env, max_batch=8)
    assert config.max_batch == 8  # flag wins
    assert config.model_dir == "/srv/models"  # env beats default
    assert config.reflection is False
    assert config.max_delay_ms == ServerConfig().max_delay_ms


def test_bad_env_value_names_the_variable():
    with pytest.raises(ValueError, match="FACETWIN_MAX_BATCH='lots'"):
        ServerConfig.from_env({"FACETWIN_MAX_BATCH": "lots"})


def test_invalid_values_are_rejected():
    with pytest.raises(ValueError, match=r"^--max-batch \(FACETWIN_MAX_BATCH\) must be >= 1, got 0$"):
        ServerConfig.from_env({}, max_batch=0)
    # Each named as the operator gives it; a float must be a number; a port must fit (a socket would wrap 99999).
    for values, message in (({"grace_s": float("nan")}, "--grace-s (FACETWIN_GRACE_S) must be a number, got nan"),
                            ({"stream_idle_timeout_s": float("inf")}, "--stream-idle-timeout-s"),
                            ({"max_calls": -1}, "--max-calls (FACETWIN_MAX_CALLS) must be >= 0 (0: no limit)"),
                            ({"metrics_port": 70000}, "--metrics-port (FACETWIN_METRICS_PORT) must be in 0..65535"),
                            ({"address": "127.0.0.1:99999"}, "a port in 0..65535"), ({"address": ":50051"}, "host:port"),
                            ({"lost_face_frames": 301}, "--lost-face-frames (FACETWIN_LOST_FACE_FRAMES) must be in 0..300"),
                            ({"tls_cert": "c.pem"}, "--tls-cert and --tls-key go together"),
                            ({"model_poll_s": 0.1}, "--model-poll-s (FACETWIN_MODEL_POLL_S) must be 0 (only on SIGHUP) "
                                                    "or at least 1, got 0.1")):
        with pytest.raises(ValueError) as info:
            ServerConfig.from_env({}, **values)
        assert message in str(info.value)
    with pytest.raises(ValueError, match="FACETWIN_MAX_DELAY_MS"):
        ServerConfig.from_env({"FACETWIN_MAX_DELAY_MS": "nan"})
    assert ServerConfig.from_env({}, address="[::]:50051").address == "[::]:50051"
    with pytest.raises(ValueError, match=r"--keep-shape \(FACETWIN_KEEP_SHAPE\) must be in 0.0..1.0"):
        ServerConfig.from_env({"FACETWIN_KEEP_SHAPE": "1.5"})
    assert ServerConfig.from_env({"FACETWIN_KEEP_SHAPE": "0.25"}).keep_shape == 0.25


def test_paste_mask_is_one_of_the_rules():
    assert ServerConfig().paste_mask == "both"
    assert ServerConfig.from_env({"FACETWIN_PASTE_MASK": "hull"}).paste_mask == "hull"
    with pytest.raises(ValueError, match="--paste-mask \\(FACETWIN_PASTE_MASK\\) 'face' must be one of hull, model, both"):
        ServerConfig.from_env({}, paste_mask="face")


def test_inference_workers_share_out_the_cores():
    from facetwin.server.backends import BACKENDS
    from facetwin.server.registry import worker_plan

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ort, torch_cpu = BACKENDS["onnxruntime"], BACKENDS["torch-cpu"]
    assert worker_plan(ServerConfig(), ort) == (2, max(1, cores // 2))  # the CPU default: two half-core sessions
    assert worker_plan(ServerConfig(), torch_cpu) == (1, 0)  # one worker keeps the backend's own default
    assert worker_plan(ServerConfig(inference_workers=3, intra_op_threads=5), ort) == (3, 5)  # flags win
    assert worker_plan(ServerConfig(inference_workers=1), ort) == (1, 0)
    with pytest.raises(ValueError, match="--inference-workers"):
        ServerConfig.from_env({"FACETWIN_INFERENCE_WORKERS": "-1"})


def test_every_setting_is_a_flag_with_its_environment_variable():
    """The serve command's flags are built from ServerConfig's fields: a new setting needs no other edit."""
    import dataclasses
    import subprocess
    import sys
    from pathlib import Path

    server = Path(sys.executable).parent / "facetwin-server"
    result = subprocess.run([str(server), "serve", "--help"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 0, result.stderr
    for field in dataclasses.fields(ServerConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in result.stdout and f"FACETWIN_{field.name.upper()}" in result.stdout, field.name
    bad = subprocess.run([str(server), "serve", "--max-batch", "0", "--model-dir", "."], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "error: --max-batch (FACETWIN_MAX_BATCH) must be >= 1, got 0" in bad.stderr

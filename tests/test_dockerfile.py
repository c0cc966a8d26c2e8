"""The GPU Dockerfile, checked without a Docker engine: its shape, then its exact entrypoint in a fresh venv."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            keyword, _, args = current.partition(" ")
            lines.append((keyword.upper(), args.strip()))
            current = ""
    return lines


def env_of(parsed) -> dict[str, str]:
    env = {}
    for keyword, args in parsed:
        if keyword == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_base_image_is_a_pinned_tensorrt_release():
    (base,) = [args for keyword, args in instructions() if keyword == "FROM"]
    image, _, tag = base.partition(":")
    assert image == "nvcr.io/nvidia/tensorrt"
    assert tag and tag != "latest" and tag[:2].isdigit(), f"unpinned base image {base}"


def test_runs_as_non_root_with_health_check_and_ports():
    parsed = instructions()
    users = [args for keyword, args in parsed if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    (expose,) = [args for keyword, args in parsed if keyword == "EXPOSE"]
    assert "50051" in expose.split()
    (health,) = [args for keyword, args in parsed if keyword == "HEALTHCHECK"]
    assert '"facetwin-server", "healthcheck"' in health
    env = env_of(parsed)
    assert env["FACETWIN_BACKEND"] == "auto" and env["FACETWIN_ENGINE_CACHE_DIR"].startswith("/cache")
    assert env["FACETWIN_METRICS_ADDRESS"] == "0.0.0.0"  # the metrics port is published: not loopback in a container
    install = " ".join(args for keyword, args in parsed if keyword == "RUN")
    assert '.[server,gpu]' in install


@pytest.mark.slow
def test_entrypoint_serves_in_a_fresh_venv(tmp_path, tiny_model_dir):
    """`pip install .[server]` of what the image's COPY lines bring into a new venv, then the image's exact ENTRYPOINT
    (plus --dry-run) with its ENV."""
    parsed = instructions()
    entrypoint = json.loads(next(args for keyword, args in parsed if keyword == "ENTRYPOINT"))
    context = tmp_path / "image"  # only what the image gets: a file the build needs but COPY forgets fails here
    for keyword, args in parsed:
        if keyword == "COPY":
            *sources, dest = args.split()
            for source in sources:
                target = context / dest / Path(source).name if dest.endswith("/") else context / dest
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / source, target)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{context}[server]"],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-2000:]
    licence = subprocess.run([str(venv / "bin" / "python"), "-c", "from importlib.metadata import distribution; "
                              "print(distribution('facetwin').read_text('licenses/LICENSE'))"],
                             capture_output=True, text=True, check=True, cwd=tmp_path)  # not this checkout's
    assert "MIT License" in licence.stdout  # the image's install carries the licence text its metadata names
    env = {**os.environ, **env_of(parsed), "FACETWIN_MODEL_DIR": str(tiny_model_dir),
           "FACETWIN_ENGINE_CACHE_DIR": str(tmp_path / "engines"), "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    result = subprocess.run(entrypoint + ["--dry-run"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dry run ok: 1 model(s)" in result.stdout
    assert "auto" in result.stderr and "onnxruntime" in result.stderr  # auto explains its pick in the log

"""What the examples share: running the commands a user would type, and a facetwin-server on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from facetwin.client import Client, UnavailableError
from facetwin.training.run_folder import TrainSummary, read_summary

BIN = Path(sys.executable).parent


def banner(step: int, total: int, text: str) -> None:
    print(f"\n==> [{step}/{total}] {text}", flush=True)


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def finished_training(run_dir: Path) -> TrainSummary:
    """The summary `facetwin-train train` left in run_dir: steps (fewer than asked if its time budget ran out),
    seconds, losses, the checkpoint's path."""
    summary = read_summary(run_dir)
    if summary is None or summary.stopped is None:
        raise SystemExit(f"error: facetwin-train train finished but left no finished training summary in {run_dir}")
    return summary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(client: Client, model: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            models = {m.name: m for m in client.list_models(timeout=2)}
            if models.get(model) and models[model].status == "ready":
                return
            if models.get(model) and models[model].status == "failed":
                raise SystemExit(f"error: the server could not load {model}: {models[model].error}")
        except UnavailableError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise SystemExit(f"error: the server did not get {model} ready within {timeout_s:.0f} s")
        time.sleep(0.2)


@contextlib.contextmanager
def serving(model_dir: Path) -> Iterator[str]:
    """`facetwin-server serve` of model_dir on a free loopback port; yields its address, stops it (SIGTERM) on exit."""
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, FACETWIN_MODEL_DIR=str(model_dir), FACETWIN_ADDRESS=address, FACETWIN_LOG_LEVEL="WARNING")
    server = subprocess.Popen([str(BIN / "facetwin-server"), "serve"], env=env)
    try:
        yield address
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)

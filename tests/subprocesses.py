"""Running the product's commands as subprocesses from tests, the way a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: `python -m examples.demo` runs from here


def command_env(**extra: str) -> dict[str, str]:
    """This environment for a child process, without server settings that would redirect it, plus `extra`.
    (OMP_WAIT_POLICY=PASSIVE comes from tests/conftest.py: spin-waiting threads crawl on a busy 2-core host.)"""
    env = {**os.environ, **extra}
    env.pop("FACETWIN_MODEL_DIR", None)
    env.pop("FACETWIN_ADDRESS", None)
    return env


def run_module(module: str, *args: str, env: dict[str, str] | None = None,
               timeout: float = 280) -> subprocess.CompletedProcess:
    """`python -m module args...` with captured text output."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                          env=command_env() if env is None else env, timeout=timeout)


def popen_for_ctrl_c(cmd: list[str], **kwargs) -> subprocess.Popen:
    """subprocess.Popen for a child the test will press Ctrl-C in (send SIGINT to). A command started from a terminal
    gets Ctrl-C; one started by a shell in the background inherits SIGINT ignored and rightly keeps ignoring it. The
    tests may run in the background (CI): a handled signal reaches the child as the default, as from a terminal.
    Call from the main thread."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(cmd, **kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)

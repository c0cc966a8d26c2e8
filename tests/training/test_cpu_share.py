"""CpuShare: a process busy on one of the run's cores is seen, and the thread count follows it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from facetwin.training.cpu_share import CpuShare

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat") or not hasattr(os, "sched_getaffinity"),
                                reason="reads Linux /proc")
BUSY = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"


def test_a_busy_process_on_one_core_takes_that_core():
    cpus = sorted(os.sched_getaffinity(0))
    share = CpuShare(max_threads=len(cpus))
    busy = subprocess.Popen([sys.executable, "-c", BUSY, str(cpus[0])])
    try:
        time.sleep(0.3)  # let it start
        before = share._sample()
        time.sleep(1.0)
        after = share._sample()
    finally:
        busy.kill()
        busy.wait(10)
    assert share.free_cores(before, after) <= len(cpus) - 1


def test_the_count_changes_only_after_two_readings_agree():
    share = CpuShare(max_threads=4, check_every_s=0.0)
    share.cpus = {0, 1, 2, 3}
    readings = iter([2.0, 4.0, 2.0, 2.0, 2.0])  # one busy moment, then a lasting change
    share.free_cores = lambda before, after: next(readings)
    seen = [share.update() for _ in range(5)]
    assert seen == [None, None, None, 2, None] and share.threads == 2

"""CPU threads that follow the share of the machine that is free.

torch splits every operator over its intra-op threads and waits for the slowest. When another process runs on one
of two cores, the thread that shares that core gets a slice of it now and then, and every operator waits for it:
make demo's training fell from ~11 steps/s to ~0.7 with one busy single-threaded process beside it. One thread per
core that is actually free avoids the wait. So every few seconds CpuShare reads how busy the run's cores were
(/proc/stat) apart from this process's own time (/proc/self/stat), and sets torch's thread count to the cores left
free (at least one, at most the configured count). Elsewhere than Linux it keeps the configured count.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

CHECK_EVERY_S = 2.0
# A core counts as taken when other processes kept it this busy; below, their load is noise (daemons, the shell).
TAKEN = 0.5


def _cpu_jiffies(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies of these CPUs since boot, from /proc/stat; None where it cannot be read."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(v) for v in fields[:8]]
            idle = values[3] + values[4]  # idle + iowait
            busy += sum(values) - idle
            total += sum(values)
    return busy, total


def _own_jiffies() -> int | None:
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime, every thread of this process


class CpuShare:
    """Call update() once per step; it returns the thread count to use when that should change, else None."""

    def __init__(self, max_threads: int, check_every_s: float = CHECK_EVERY_S) -> None:
        self.max_threads = max(1, max_threads)
        self.threads = self.max_threads
        self.check_every_s = check_every_s
        self.cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        self._last = self._sample()
        self._pending: int | None = None  # a new count seen once; taken when the next reading agrees

    def _sample(self) -> tuple[float, int, int, int] | None:
        machine, own = _cpu_jiffies(self.cpus), _own_jiffies()
        if machine is None or own is None or not self.cpus:
            return None
        return time.monotonic(), machine[0], machine[1], own

    def free_cores(self, before: tuple[float, int, int, int], after: tuple[float, int, int, int]) -> float:
        """Cores of this run's CPU set that other processes left free between two samples."""
        busy = after[1] - before[1]
        total = after[2] - before[2]
        own = after[3] - before[3]
        if total <= 0:
            return float(len(self.cpus))
        others = max(0, busy - own) / total * len(self.cpus)  # cores kept busy by everyone else
        return len(self.cpus) - int(others + (1 - TAKEN))  # round a core up as taken from TAKEN of it

    def update(self) -> int | None:
        if self._last is None or time.monotonic() - self._last[0] < self.check_every_s:
            return None
        now = self._sample()
        if now is None:
            return None
        wanted = max(1, min(self.max_threads, int(self.free_cores(self._last, now))))
        self._last = now
        if wanted == self.threads:
            self._pending = None
            return None
        if self._pending != wanted:  # two readings in a row, so one busy moment does not flip it
            self._pending = wanted
            return None
        self.threads, self._pending = wanted, None
        return wanted

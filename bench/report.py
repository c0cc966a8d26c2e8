"""What every bench script reports the same way: the host, and the JSON report (stdout and optionally a file)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from facetwin.core.files import atomic_write_bytes


def host_info() -> dict:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}


def process_cpu_seconds(pid: int, descendants: bool = False) -> float | None:
    """User + system CPU seconds a process (and, with `descendants`, the live processes it started, a server's
    serving processes) has used so far (Linux /proc), or None where /proc is unavailable."""
    stats = _proc_stats() if descendants else _proc_stats([Path(f"/proc/{pid}/stat")])
    if pid not in stats:
        return None
    pids, tree = {pid}, {pid}
    while descendants and pids:
        pids = {child for child, (parent, _) in stats.items() if parent in pids} - tree
        tree |= pids
    return sum(stats[p][1] for p in tree) / os.sysconf("SC_CLK_TCK")


def _proc_stats(files: list[Path] | None = None) -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, user + system clock ticks) of the processes whose /proc stat files are given (default:
    every process /proc shows)."""
    stats = {}
    for entry in Path("/proc").glob("[0-9]*/stat") if files is None else files:
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        stats[int(entry.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
    return stats


def write_report(report: dict, json_path: str | None, echo: bool = True) -> None:
    """Prints the report as JSON (echo) and, with json_path, also writes it there."""
    text = json.dumps(report, indent=2)
    if echo:
        print(text)
    if json_path:
        atomic_write_bytes(json_path, (text + "\n").encode())


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Writes data as JSON through a rename: a bench killed at its deadline mid-write leaves the file it had
    (whoever reads it, such as the GPU bench's phases, never sees half a file)."""
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())

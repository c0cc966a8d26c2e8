"""What every bench script reports the same way: the host, and the JSON report (stdout and optionally a file)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


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
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n")

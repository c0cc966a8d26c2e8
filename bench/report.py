"""What every bench script reports the same way: the host, and the JSON report (stdout and optionally a file)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def host_info() -> dict:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far (Linux /proc), or None where /proc is unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def write_report(report: dict, json_path: str | None, echo: bool = True) -> None:
    """Prints the report as JSON (echo) and, with json_path, also writes it there."""
    text = json.dumps(report, indent=2)
    if echo:
        print(text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n")

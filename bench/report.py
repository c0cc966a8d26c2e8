"""What every bench script reports the same way: the host, and the JSON report (stdout and optionally a file)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def host_info() -> dict:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}


def write_report(report: dict, json_path: str | None) -> None:
    """Prints the report as JSON and, with json_path, also writes it there."""
    text = json.dumps(report, indent=2)
    print(text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n")

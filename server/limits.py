"""Admission: how many unary calls and streams each client, and the whole server, may have at once.

Checked when a call arrives, before its request is decoded or a stream's first frame is read, so a caller over its
share costs the server nothing and never slows anyone else down. All bookkeeping runs on the server's event loop,
so plain counters suffice.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterator

from .errors import ResourceExhaustedError


@dataclasses.dataclass(frozen=True)
class AdmissionLimits:
    """0 means no limit (ServerConfig.max_calls_per_client, ...)."""

    calls_per_client: int = 0
    streams_per_client: int = 0
    calls: int = 0
    streams: int = 0


class Admission:
    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self._open = {"call": collections.Counter(), "stream": collections.Counter()}  # kind -> client -> open

    def open(self, kind: str) -> int:
        """Calls ("call") or streams ("stream") open on the whole server."""
        return sum(self._open[kind].values())

    @contextlib.contextmanager
    def admit(self, kind: str, client: str) -> Iterator[None]:
        """Holds one slot of `kind` for `client` for the block; ResourceExhaustedError when none is free."""
        counts = self._open[kind]
        per_client = self.limits.calls_per_client if kind == "call" else self.limits.streams_per_client
        total = self.limits.calls if kind == "call" else self.limits.streams
        what = "unary calls" if kind == "call" else "streams"
        if per_client and counts[client] >= per_client:
            raise ResourceExhaustedError(f"this client already has {counts[client]} {what} open, the most the server "
                                         f"allows one client: wait for one to finish (GetServerInfo limits)")
        if total and sum(counts.values()) >= total:
            raise ResourceExhaustedError(f"the server has {total} {what} open, its limit: retry with backoff or on "
                                         "another replica")
        counts[client] += 1
        try:
            yield
        finally:
            counts[client] -= 1
            if not counts[client]:
                del counts[client]


"""What the server takes on at once: calls and streams (Admission), and decoded images (FrameMemory).

Admission is checked when a call arrives, before its request is decoded or a stream's first frame is read, so a
caller over its share costs the server nothing and never slows anyone else down. FrameMemory bounds the pixels
decoded at once: a 60 KB PNG can decode to 48 MB, so the calls and streams admission allows could otherwise hold
tens of GB. All bookkeeping runs on the server's event loop, so plain counters suffice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

from . import metrics
from .errors import DeadlineExceededError, ResourceExhaustedError

MIB = 1024 * 1024
# A busy serving process grows by about this many times its frame memory over its idle size: the resize, paste and
# encoding copy a decoded image again (bench/memory.py, docs/benchmarks.md).
FRAME_MEMORY_GROWTH = 1.5
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # cgroup v2, v1


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


class FrameMemory:
    """Bytes of decoded images the server works on at once (ServerConfig.frame_memory_mb; 0 = no limit).

    An image claims its decoded size (width x height x 3, known from its header or raw fields before decoding) and
    waits until it fits. Claims are granted strictly in the order they were made: a stream's frames, claimed in
    frame order, can then never hold the memory an earlier frame of theirs waits for, and a large image is not
    starved by smaller ones behind it. Waiting costs only the request's own bytes, which admission bounds."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.held = 0
        self._line: collections.deque[Claim] = collections.deque()  # claims not granted yet, in claim order

    @property
    def waiting(self) -> int:
        return len(self._line)

    def claim(self, size: int) -> "Claim":
        """Takes a place in line for `size` bytes, at once (no await: the order of claims is the order of calls);
        ResourceExhaustedError for an image that could never fit."""
        if self.limit and size > self.limit:
            raise ResourceExhaustedError(f"the request's images need {size / MIB:.1f} MiB decoded, more than the "
                                         f"server's frame memory ({self.limit / MIB:.1f} MiB): send smaller images")
        claim = Claim(self, size)
        self._line.append(claim)
        self._grant()
        return claim

    def _grant(self) -> None:
        while self._line and (not self.limit or self.held + self._line[0].size <= self.limit):
            claim = self._line.popleft()
            self.held += claim.size
            claim.granted = True
            if claim.ready is not None and not claim.ready.done():
                claim.ready.set_result(None)
        metrics.FRAME_MEMORY_BYTES.set(self.held)
        metrics.FRAME_MEMORY_WAITING.set(len(self._line))

    def _leave(self, claim: "Claim") -> None:
        if claim.granted:
            self.held -= claim.size
        else:
            self._line.remove(claim)
        self._grant()


class Claim:
    """One image's place in FrameMemory: `await claim.wait(seconds)`, then `claim.release()` once its decoded pixels
    are no longer needed (release also gives up a place still waiting)."""

    def __init__(self, memory: FrameMemory, size: int) -> None:
        self.memory, self.size = memory, size
        self.granted = False
        self.ready: asyncio.Future | None = None
        self._released = False

    async def wait(self, timeout_s: float | None = None) -> None:
        """Returns once granted; DeadlineExceededError after timeout_s (None: no limit)."""
        if self.granted:
            return
        self.ready = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self.ready, timeout_s)
        except asyncio.TimeoutError:
            memory = self.memory
            raise DeadlineExceededError(
                f"the call's deadline passed while its image waited for the server's frame memory ({memory.held / MIB:.0f} "
                f"of {memory.limit / MIB:.0f} MiB in use, {memory.waiting} images waiting): the server is busy; "
                "retry with backoff or on another replica") from None

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.memory._leave(self)


def memory_available() -> int | None:
    """The memory this server may use, bytes: its container's limit (cgroup) or the host's, whichever is smaller;
    None where neither can be read."""
    sizes = []
    for path in _CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max": no limit
            sizes.append(int(text))
    try:
        sizes.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        pass
    return min(sizes) if sizes else None


def frame_memory_warning(frame_memory_mb: int, processes: int, available: int | None) -> str | None:
    """A warning when busy serving could grow past half the memory available (the rest is for the models, gRPC's
    buffers and the requests themselves), else None."""
    if not frame_memory_mb or available is None:
        return None
    growth = FRAME_MEMORY_GROWTH * frame_memory_mb * MIB * processes
    if growth <= available / 2:
        return None
    return (f"--frame-memory-mb {frame_memory_mb} x {processes} serving process(es) lets a busy server grow by about "
            f"{growth / 2**30:.1f} GiB, more than half of the {available / 2**30:.1f} GiB it may use: lower "
            "--frame-memory-mb or --processes (docs/server.md#memory)")

"""One SwapStream as domain logic: frames in, results out in arrival order, with a flow-control policy.

- "queue": every frame is swapped. Once `window` frames are in flight the stream stops reading, which pushes back
  on the sender through gRPC flow control.
- "latest" (latest frame wins): up to `window` frames run at once; when the stream falls behind, a frame still
  waiting to start is answered DROPPED as soon as a newer frame arrives. Dropped frames are answered, in order,
  never silently lost.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .errors import InvalidInputError, SwapError

POLICIES = ("queue", "latest")
DROPPED = object()  # the result of a frame answered as dropped


async def run_stream(
    frames: AsyncIterator[tuple[int, Any]],
    swap: Callable[[Any], Awaitable[Any]],
    *,
    window: int,
    policy: str = "queue",
) -> AsyncIterator[tuple[int, Any]]:
    """Yields (frame_id, outcome or DROPPED) in arrival order.

    `frames` yields (frame_id, job) — a job may be an Exception (an invalid frame), which is raised when its turn
    comes, after every earlier frame's result. `swap(job)` computes one outcome.
    """
    if policy not in POLICIES:
        raise InvalidInputError(f"stream policy {policy!r} is not one of {POLICIES}")
    loop = asyncio.get_running_loop()
    entries: asyncio.Queue = asyncio.Queue(maxsize=4 * window)  # answers not yet sent, in arrival order
    waiting: collections.deque = collections.deque()  # ("latest") frames not started yet
    running: set[asyncio.Task] = set()
    in_flight = 0  # frames started and not finished (the window counts these)
    freed = asyncio.Event()
    end = object()

    async def run_one(job: Any, future: asyncio.Future) -> None:
        nonlocal in_flight
        try:
            outcome = await swap(job)
            if not future.done():
                future.set_result(outcome)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        finally:
            in_flight -= 1
            freed.set()
            start_waiting()

    def start(job: Any, future: asyncio.Future) -> None:
        nonlocal in_flight
        in_flight += 1
        task = loop.create_task(run_one(job, future))
        running.add(task)
        task.add_done_callback(running.discard)

    def start_waiting() -> None:
        while waiting and in_flight < window:
            start(*waiting.popleft())

    async def read() -> None:
        count = 0
        async for frame_id, job in frames:
            count += 1
            future = loop.create_future()
            if isinstance(job, Exception):
                future.set_exception(job)
            elif policy == "queue":
                while in_flight >= window:
                    freed.clear()
                    await freed.wait()
                start(job, future)
            else:
                waiting.append((job, future))
                while len(waiting) > 1:  # latest frame wins: older unstarted frames are dropped
                    _, stale = waiting.popleft()
                    stale.set_result(DROPPED)
                start_waiting()
            await entries.put((frame_id, future))
        if count == 0:
            future = loop.create_future()
            future.set_exception(InvalidInputError("the stream carried no frames: send at least one SwapStreamRequest"))
            await entries.put((None, future))
        await entries.put(end)

    reader = loop.create_task(read())
    try:
        while True:
            getter = loop.create_task(entries.get())
            await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():  # the reader ended without `end`: the caller went away or sent garbage
                getter.cancel()
                reader.result()
                return
            entry = getter.result()
            if entry is end:
                return
            frame_id, future = entry
            try:
                result = await future
            except SwapError as exc:
                if frame_id is None:
                    raise
                raise type(exc)(f"frame {frame_id}: {exc}") from exc
            yield frame_id, result
    finally:
        reader.cancel()
        for task in list(running):
            task.cancel()
        while not entries.empty():
            entry = entries.get_nowait()
            if entry is not end:
                entry[1].cancel()

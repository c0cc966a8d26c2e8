"""One SwapStream as domain logic: frames in, one answer per frame out, in arrival order.

Flow control follows the stream's policy:
- "queue": every frame is swapped. Once `window` frames are in flight the stream stops reading, which pushes back
  on the sender through HTTP/2 flow control; it never fails for being fast. With `admit` (the server's frame
  memory), the stream also reads no further until the frame it holds is admitted, so it never holds more than one
  frame waiting for memory.
- "latest" (latest frame wins): up to `window` frames run at once; when the stream falls behind, a frame still
  waiting to start is answered DROPPED as soon as a newer frame arrives. With `admit`, a frame starts once admitted,
  one frame at a time, and a frame still waiting for admission is dropped for a newer one like any frame not started:
  the stream holds at most one frame waiting for memory, the newest.

A frame that cannot be swapped is answered with its error, in its place, and the stream goes on: one bad frame
never costs the caller the frames after it. The stream itself ends early only when the caller sends nothing for
`idle_timeout_s` (DEADLINE_EXCEEDED), or when the server drains (`stop` is set): it then takes no new frame,
answers every frame it took, and ends with UNAVAILABLE so the caller reconnects and resends the rest.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .errors import DeadlineExceededError, DrainingError, InvalidInputError, SwapError

log = logging.getLogger(__name__)

POLICIES = ("queue", "latest")
OK, DROPPED, ERROR = "ok", "dropped", "error"


@dataclasses.dataclass(frozen=True)
class FrameAnswer:
    """What happened to one frame."""

    frame_id: int
    status: str  # OK | DROPPED | ERROR
    outcome: Any = None  # the swap's result, with OK
    error: SwapError | None = None  # why, with ERROR


class _End:
    """Queued after the last answer."""


class StreamRun:
    """Runs one stream: `async for answer in StreamRun(...).answers()`.

    `frames` yields (frame_id, job); a job may be a SwapError (a frame that could not even be read), answered with
    that error in its place. `swap(job)` computes one outcome; it is called in arrival order. `admit(job)`: awaited
    before a frame starts, in arrival order, one frame at a time; it returns (what swap() gets, a release function
    called once the frame's task ends, however it ends), or raises a SwapError that answers the frame; under the
    latest policy it may be cancelled (the frame dropped for a newer one)."""

    def __init__(self, frames: AsyncIterator[tuple[int, Any]], swap: Callable[[Any], Awaitable[Any]], *,
                 window: int, policy: str = "queue", stop: asyncio.Event | None = None,
                 idle_timeout_s: float = 0.0,
                 admit: Callable[[Any], Awaitable[tuple[Any, Callable[[], None]]]] | None = None) -> None:
        if policy not in POLICIES:
            raise InvalidInputError(f"stream policy {policy!r} is not one of {POLICIES}")
        self._frames, self._swap, self._admit = frames, swap, admit
        self.window, self.policy, self.idle_timeout_s = window, policy, idle_timeout_s
        self._stop = stop
        # Answers not yet sent, in arrival order. Bounded, so a caller that stops reading its answers stops the
        # stream from reading frames too (push-back both ways).
        self._answers: asyncio.Queue = asyncio.Queue(maxsize=4 * window)
        self._waiting: collections.deque = collections.deque()  # "latest": frames not started yet
        # "latest" with admit: (task, frame id, answer) of the frame being admitted; its window place is taken
        self._admitting: tuple[asyncio.Task, int, asyncio.Future] | None = None
        self._running: set[asyncio.Task] = set()
        # Frames started and not yet answered to the caller (the window counts these): a finished answer holds its
        # image until it is sent, so a caller that stops reading holds at most a window of them in the server.
        self._in_flight = 0
        self._started: set[int] = set()  # id() of the answers of frames started and not yet sent
        self._freed = asyncio.Event()
        self._end_error: Exception | None = None  # how the stream ends once every answer is out

    async def answers(self) -> AsyncIterator[FrameAnswer]:
        """Every frame's answer in arrival order; raises the stream's own ending error (idle, drain, no frames)
        after the last answer."""
        reader = asyncio.get_running_loop().create_task(self._read())
        try:
            while not isinstance(entry := await self._answers.get(), _End):
                yield await entry
                if id(entry) in self._started:  # sent: its place in the window is free
                    self._started.discard(id(entry))
                    self._release()
            if self._end_error is not None:
                raise self._end_error
        finally:
            reader.cancel()
            for task in list(self._running):
                task.cancel()
            await asyncio.gather(reader, *self._running, return_exceptions=True)

    # -- reading frames ---------------------------------------------------------------------------------------

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        count = 0
        try:
            while (frame := await self._next_frame()) is not None:
                count += 1
                frame_id, job = frame
                answer = loop.create_future()
                if isinstance(job, SwapError):
                    answer.set_result(FrameAnswer(frame_id, ERROR, error=job))
                elif self.policy == "queue":
                    await self._room()
                    release = None
                    if self._admit is not None:
                        try:
                            job, release = await self._admit(job)
                        except SwapError as exc:  # this frame only (its deadline passed waiting): the stream goes on
                            answer.set_result(FrameAnswer(frame_id, ERROR, error=exc))
                    if not answer.done():
                        self._start(frame_id, job, answer, release)
                else:
                    self._wait_latest(frame_id, job, answer)
                await self._answers.put(answer)
            if count == 0 and self._end_error is None:
                self._end_error = InvalidInputError("the stream carried no frames: send at least one "
                                                    "SwapStreamRequest")
        except SwapError as exc:  # the caller's side failed: idle, or a message that ended the stream
            self._end_error = exc
        except Exception as exc:  # a bug reading frames: the frames taken are answered, then the stream ends with it
            self._end_error = exc  # (INTERNAL, logged with its traceback by the interceptor), never as a clean end
        finally:  # a frame still waiting ("latest") starts when a running one finishes: taken frames are answered
            await self._answers.put(_End())

    async def _next_frame(self) -> tuple[int, Any] | None:
        """The next frame; None at the end of the stream or when the server drains; DeadlineExceededError when the
        caller has sent nothing for idle_timeout_s."""
        try:
            return await next_message(self._frames, self.idle_timeout_s, self._stop)
        except DrainingError as exc:
            self._end_error = exc
            return None

    # -- running frames ---------------------------------------------------------------------------------------

    async def _room(self) -> None:
        while self._in_flight >= self.window:
            self._freed.clear()
            await self._freed.wait()

    def _wait_latest(self, frame_id: int, job: Any, answer: asyncio.Future) -> None:
        self._waiting.append((frame_id, job, answer))
        while len(self._waiting) > 1:  # latest frame wins: older frames not started yet are dropped
            stale_id, _, stale = self._waiting.popleft()
            stale.set_result(FrameAnswer(stale_id, DROPPED))
        if self._admitting is not None:  # so is one still waiting for admission (its admit gives its place up)
            task, stale_id, stale = self._admitting
            self._admitting = None
            self._in_flight -= 1
            task.cancel()
            stale.set_result(FrameAnswer(stale_id, DROPPED))
        self._start_latest()

    def _start_latest(self) -> None:
        """Starts the waiting frame where the window has room (after its admission, with admit)."""
        while self._waiting and self._in_flight < self.window and self._admitting is None:
            frame_id, job, answer = self._waiting.popleft()
            if self._admit is None:
                self._start(frame_id, job, answer)
                continue
            self._in_flight += 1  # the frame's place while it is admitted
            task = asyncio.get_running_loop().create_task(self._admit_latest(frame_id, job, answer))
            self._admitting = (task, frame_id, answer)
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _admit_latest(self, frame_id: int, job: Any, answer: asyncio.Future) -> None:
        assert self._admit is not None
        release = None
        try:
            job, release = await self._admit(job)
        except SwapError as exc:  # this frame only (its deadline passed waiting): the stream goes on
            answer.set_result(FrameAnswer(frame_id, ERROR, error=exc))
        # Admitted or refused, never dropped meanwhile (a newer frame cancels this task, and only while it waits).
        self._admitting = None
        self._in_flight -= 1
        if release is not None:
            self._start(frame_id, job, answer, release)
        self._start_latest()

    def _start(self, frame_id: int, job: Any, answer: asyncio.Future,
               release: Callable[[], None] | None = None) -> None:
        self._in_flight += 1
        self._started.add(id(answer))
        task = asyncio.get_running_loop().create_task(self._run(frame_id, job, answer))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        if release is not None:  # a callback, not a finally: a task cancelled before its first step runs no code
            task.add_done_callback(lambda _: release())

    async def _run(self, frame_id: int, job: Any, answer: asyncio.Future) -> None:
        try:
            result = FrameAnswer(frame_id, OK, outcome=await self._swap(job))
        except SwapError as exc:
            result = FrameAnswer(frame_id, ERROR, error=exc)
        except asyncio.CancelledError:
            answer.cancel()
            raise
        except Exception as exc:  # a bug: this frame fails as INTERNAL, the stream and the server go on
            log.exception("stream frame %d failed", frame_id)
            result = FrameAnswer(frame_id, ERROR, error=SwapError(f"internal error ({type(exc).__name__}); see the "
                                                                  "server log"))
        if not answer.done():
            answer.set_result(result)

    def _release(self) -> None:
        self._in_flight -= 1
        self._freed.set()
        self._start_latest()


async def next_message(messages: AsyncIterator[Any], idle_timeout_s: float, stop: asyncio.Event | None) -> Any:
    """The next of a stream's messages (None at its end), waiting at most idle_timeout_s (0: no limit): after it,
    DeadlineExceededError; DrainingError once `stop` is set (the server drains) before one arrives."""
    if stop is not None and stop.is_set():
        raise DrainingError()
    nxt = asyncio.ensure_future(anext(messages, None))
    waiters = {nxt}
    stopping = None
    if stop is not None:
        stopping = asyncio.ensure_future(stop.wait())
        waiters.add(stopping)
    try:
        done, _ = await asyncio.wait(waiters, timeout=idle_timeout_s or None, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if stopping is not None:
            stopping.cancel()
    if nxt in done:
        return nxt.result()
    nxt.cancel()
    if stopping is not None and stopping in done:
        raise DrainingError()
    raise DeadlineExceededError(f"the stream sent no frame for {idle_timeout_s:g} s (the server's idle stream "
                                "timeout): send frames more often, or close the stream and open a new one")

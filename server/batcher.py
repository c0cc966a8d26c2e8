"""Dynamic batching: one batcher per (model, target), shared by unary calls and every stream.

Requests queue per caller (a client connection for unary calls, the stream for SwapStream); batches are
filled round-robin across callers, so one busy stream cannot starve everyone else.

When a batch goes:
* while no batch is running, at once, with whatever is queued: a lone request never waits for company that
  nothing is sending (waiting max_delay_s there would add 2 ms to every lone call: a quarter of the 2-core CPU
  host's lone-call p50, and alone as much as a GPU's 2 ms p50 target);
* while batches run, the next one forms: it goes when it is full, or when a worker is free and its oldest request
  has waited `max_delay_s` (only with several workers; with one, a free worker means nothing runs). Most batching
  under load comes from here. Not at once whenever a worker is free: while the other worker runs, the free one
  would take each request as it trickles in, so batches shrink (simulated with two sleeping workers and 256
  callers resubmitting within 0-4 ms: a mean batch of 68 instead of 84), and on a GPU the two workers share the
  device, so small batches cost it more time per face.

A batch goes to its executor thread the moment it is formed (see _loop). While every worker is busy, one more
batch may wait in the executor behind them, but only a full one: a worker that finishes takes it at once, without
a round trip through the event loop (which is busy sending the finished batch's replies just then). Batches formed
further ahead whatever their size were tried and dropped: they made batches smaller (mean 12 instead of 16 under
bench/serve.py on the 2-core host) and did not raise throughput.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import dataclasses
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from .errors import ResourceExhaustedError, SwapError, UnavailableError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BatchInfo:
    """How one request was served."""

    size: int  # requests in its batch
    queue_s: float  # time from submit to the batch starting
    inference_s: float  # time the batch took to run


class InferenceFailedError(SwapError):
    """The backend raised while running a batch (reported as INTERNAL; the server keeps serving)."""


@dataclasses.dataclass(eq=False)
class _Pending:
    item: Any
    future: asyncio.Future
    enqueued: float
    bounded: bool = True  # counts against max_queue


class DynamicBatcher:
    """Groups single items from many callers into calls of `run_batch(items) -> results` (same length, same order)."""

    def __init__(
        self,
        run_batch: Callable[[list[Any]], Sequence[Any]],
        *,
        max_batch: int = 16,
        max_delay_s: float = 0.002,
        max_queue: int = 256,
        concurrency: int = 1,
        name: str = "batcher",
    ) -> None:
        """concurrency: batches running at once (executor threads)."""
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.name = name
        self._queues: collections.OrderedDict[Hashable, collections.deque[_Pending]] = collections.OrderedDict()
        self._size = 0
        self._bounded = 0  # queued items that count against max_queue
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._concurrency = concurrency
        self._in_flight = 0  # batches handed to the executor and not finished
        self._executor = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix=name)
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._closed = False

    @property
    def queued(self) -> int:
        return self._size

    def check_room(self, bounded: bool = True) -> None:
        """Refuses what submit() would refuse now; called first by work that must decode and find faces before it
        submits, so a full queue turns it away before that work."""
        if self._closed:
            raise UnavailableError(f"{self.name} is shutting down; retry on another replica")
        if bounded and self._bounded >= self.max_queue:
            raise ResourceExhaustedError(
                f"{self.name}: {self._bounded} requests are already queued (limit {self.max_queue}); retry with backoff"
            )

    async def submit(self, item: Any, caller: Hashable, bounded: bool = True) -> tuple[Any, BatchInfo]:
        """Queues one item and waits for its result. Cancelling the caller's task drops the item.

        bounded: the item counts against max_queue and is refused (RESOURCE_EXHAUSTED) when that many bounded items
        wait. Stream frames are submitted unbounded: each stream already holds at most its window in flight, and a
        stream that must wait should push back on its sender, not fail."""
        self.check_room(bounded)
        self._start()
        pending = _Pending(item, asyncio.get_running_loop().create_future(), time.perf_counter(), bounded)
        self._bounded += bounded
        self._queues.setdefault(caller, collections.deque()).append(pending)
        self._size += 1
        if self._size == 1 or self._size >= self.max_batch:  # what _loop and _wait_for_batch wait for
            self._wakeup.set()
        return await pending.future  # cancelled with the caller; _take skips it

    def _start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._slots = asyncio.Semaphore(self._concurrency + 1)  # + the full batch queued behind busy workers
            # Started by the first caller's submit, but it serves every caller: a fresh context, so it does not carry
            # that call's request id (logs.py) or trace span for the rest of the server's life.
            self._task = contextvars.Context().run(asyncio.get_running_loop().create_task, self._loop(), name=self.name)

    async def _loop(self) -> None:
        while True:
            while self._size == 0:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._slots.acquire()  # while the running batches run, the queue keeps filling
            await self._wait_for_batch()
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            # Hand the batch to the executor now, not in the new task's first step: that step would run only after
            # every callback already queued on the loop -- typically the replies of the batch that just finished --
            # leaving the backend idle for milliseconds per batch.
            loop = asyncio.get_running_loop()
            self._in_flight += 1
            running = loop.run_in_executor(self._executor, self._timed_run, [p.item for p in batch])
            task = loop.create_task(self._execute(batch, running))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _wait_for_batch(self) -> None:
        """Until nothing runs (then at once), max_batch items are queued, or max_delay_s after the oldest one while
        a worker is free (see the module docstring)."""
        if self._size == 0:
            return
        oldest = min(queue[0].enqueued for queue in self._queues.values())
        while self._size < self.max_batch and self._in_flight > 0:
            remaining = None  # every worker busy: only a full batch goes ahead (or wait until one is free)
            if self._in_flight < self._concurrency:
                remaining = oldest + self.max_delay_s - time.perf_counter()
                if remaining <= 0:
                    return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Pending]:
        """Up to max_batch live items, one per caller per round (round-robin across callers)."""
        batch: list[_Pending] = []
        while len(batch) < self.max_batch and self._queues:
            caller, queue = next(iter(self._queues.items()))
            pending = queue.popleft()
            self._size -= 1
            self._bounded -= pending.bounded
            if queue:
                self._queues.move_to_end(caller)
            else:
                del self._queues[caller]
            if not pending.future.done():  # done = cancelled by its caller (deadline, disconnect)
                batch.append(pending)
        return batch

    def _timed_run(self, items: list[Any]) -> tuple[Sequence[Any], float, float]:
        """Runs in the executor thread: the clock starts when the backend does, not when the batch was queued."""
        started = time.perf_counter()
        results = self._run_batch(items)
        return results, started, time.perf_counter() - started

    async def _execute(self, batch: list[_Pending], running: asyncio.Future) -> None:
        try:
            results, started, elapsed = await running
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # the backend failed: fail this batch only, keep serving
            log.exception("%s: batch of %d failed", self.name, len(batch))
            error = InferenceFailedError(f"inference failed on the server ({type(exc).__name__}: {exc})")
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        finally:
            self._in_flight -= 1
            self._slots.release()
            self._wakeup.set()  # a batch waiting for a free worker may now go at its delay
        for pending, result in zip(batch, results):
            if not pending.future.done():
                pending.future.set_result((result, BatchInfo(len(batch), started - pending.enqueued, elapsed)))

    async def close(self) -> None:
        """Stops taking work, fails what is still queued, waits for running batches, frees the thread."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        for queue in self._queues.values():
            for pending in queue:
                if not pending.future.done():
                    pending.future.set_exception(UnavailableError(f"{self.name} shut down before this request ran"))
        self._queues.clear()
        self._size = self._bounded = 0
        self._executor.shutdown(wait=True)

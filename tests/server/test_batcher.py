"""DynamicBatcher: results map to their inputs, batches form, callers are served round-robin, failures stay contained."""

import asyncio
import threading
import time

import pytest

from facetwin.server.batcher import DynamicBatcher, InferenceFailedError
from facetwin.server.errors import ResourceExhaustedError, UnavailableError


class Recorder:
    """A real batch function: doubles numbers, remembers every batch it was given (called from the worker thread)."""

    def __init__(self, delay_s: float = 0.0, fail_on: object = None):
        self.batches: list[list] = []
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, items):
        with self.lock:
            self.batches.append(list(items))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError("poisoned batch")
        return [(item, item * 2) for item in items]


async def test_results_match_inputs_and_batches_form():
    run = Recorder(delay_s=0.01)
    batcher = DynamicBatcher(run, max_batch=4, max_delay_s=0.005)
    results = await asyncio.gather(*(batcher.submit(i, caller=i % 3) for i in range(20)))
    assert [r[0] for r in results] == [(i, 2 * i) for i in range(20)]
    sizes = [len(b) for b in run.batches]
    assert sum(sizes) == 20 and max(sizes) <= 4
    assert max(sizes) > 1, f"no batching happened: {sizes}"
    assert all(info.size == len(next(b for b in run.batches if r[0][0] in b)) for r, info in
               ((r, r[1]) for r in results))
    await batcher.close()


async def test_round_robin_serves_a_late_small_caller_early():
    run = Recorder(delay_s=0.01)
    batcher = DynamicBatcher(run, max_batch=4, max_delay_s=0.001)
    greedy = [asyncio.ensure_future(batcher.submit(("greedy", i), caller="greedy")) for i in range(40)]
    await asyncio.sleep(0.002)  # the first batch is already running
    polite = [asyncio.ensure_future(batcher.submit(("polite", i), caller="polite")) for i in range(2)]
    await asyncio.gather(*greedy, *polite)
    first_polite = next(n for n, batch in enumerate(run.batches) if any(item[0] == "polite" for item in batch))
    # FIFO would serve "polite" only after all 40 greedy items (batch 10 or later).
    assert first_polite <= 2, f"polite caller waited until batch {first_polite}: {run.batches}"
    await batcher.close()


async def test_only_a_full_batch_waits_behind_busy_workers():
    """While the only worker is busy, a full batch is handed on at once (it starts the moment the worker is free,
    with no event-loop round trip); a partial one stays in the queue, where later arrivals can still join it."""
    run = Recorder(delay_s=0.05)
    batcher = DynamicBatcher(run, max_batch=2, max_delay_s=0.0, concurrency=1)
    first = asyncio.ensure_future(batcher.submit(0, caller="a"))
    await asyncio.sleep(0.01)  # [0] runs
    full = [asyncio.ensure_future(batcher.submit(i, caller="a")) for i in (1, 2)]
    await asyncio.sleep(0.01)
    assert batcher.queued == 0  # [1, 2] waits in the executor behind [0]
    lone = asyncio.ensure_future(batcher.submit(3, caller="a"))
    await asyncio.sleep(0.01)
    assert batcher.queued == 1  # [3] alone is not full: it waits for a free worker
    late = asyncio.ensure_future(batcher.submit(4, caller="a"))
    await asyncio.gather(first, *full, lone, late)
    assert run.batches == [[0], [1, 2], [3, 4]]
    await batcher.close()


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_a_lone_request_goes_at_once_whatever_the_delay(concurrency):
    """Nothing runs, so nothing else is coming: waiting max_delay_s for company would only add latency."""
    batcher = DynamicBatcher(Recorder(), max_batch=16, max_delay_s=1.0, concurrency=concurrency)
    started = time.perf_counter()
    for i in range(3):
        result, info = await batcher.submit(i, caller="a")
        assert result == (i, 2 * i) and info.size == 1 and info.queue_s < 0.1
    assert time.perf_counter() - started < 0.5  # not 3 x 1 s
    await batcher.close()


async def test_requests_arriving_while_the_worker_runs_form_the_next_batch():
    run = Recorder(delay_s=0.05)
    batcher = DynamicBatcher(run, max_batch=8, max_delay_s=1.0, concurrency=1)
    first = asyncio.ensure_future(batcher.submit(0, caller="a"))
    await asyncio.sleep(0.01)  # [0] runs alone, at once
    later = [asyncio.ensure_future(batcher.submit(i, caller=i)) for i in (1, 2, 3)]
    await asyncio.sleep(0.01)
    assert batcher.queued == 3  # forming: neither full nor a worker free
    results = await asyncio.gather(first, *later)
    assert run.batches == [[0], [1, 2, 3]]  # the moment the worker was free, not after the 1 s delay
    assert all(info.queue_s < 0.5 for _, info in results)
    await batcher.close()


async def test_with_two_workers_a_partial_batch_waits_up_to_the_delay_while_one_runs():
    """A free second worker does not take each request as it comes while the first runs: the batch forms for up to
    max_delay_s, so later arrivals join it."""
    run = Recorder(delay_s=0.2)
    batcher = DynamicBatcher(run, max_batch=8, max_delay_s=0.05, concurrency=2)
    first = asyncio.ensure_future(batcher.submit(0, caller="a"))
    await asyncio.sleep(0.01)  # [0] runs on one worker
    second = asyncio.ensure_future(batcher.submit(1, caller="b"))
    await asyncio.sleep(0.01)
    third = asyncio.ensure_future(batcher.submit(2, caller="c"))
    results = await asyncio.gather(first, second, third)
    assert run.batches == [[0], [1, 2]]
    assert 0.04 <= results[1][1].queue_s < 0.15  # the delay, not the first batch's 0.2 s
    await batcher.close()


async def test_queue_limit_gives_resource_exhausted():
    run = Recorder(delay_s=0.05)
    batcher = DynamicBatcher(run, max_batch=1, max_delay_s=0.0, max_queue=3)
    tasks = [asyncio.ensure_future(batcher.submit(i, caller="a")) for i in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhaustedError, match="retry"):
        await batcher.submit(99, caller="b")
    assert [r[0] for r in await asyncio.gather(*tasks)] == [(0, 0), (1, 2), (2, 4)]
    await batcher.close()


async def test_failing_batch_fails_only_its_callers():
    run = Recorder(fail_on=13)
    batcher = DynamicBatcher(run, max_batch=1, max_delay_s=0.0)
    with pytest.raises(InferenceFailedError, match="poisoned"):
        await batcher.submit(13, caller="bad")
    result, _ = await batcher.submit(4, caller="good")
    assert result == (4, 8)
    await batcher.close()


async def test_cancelled_request_is_never_run():
    run = Recorder(delay_s=0.05)
    batcher = DynamicBatcher(run, max_batch=1, max_delay_s=0.0)
    first = asyncio.ensure_future(batcher.submit(1, caller="a"))
    await asyncio.sleep(0.01)  # 1 is running; 2 waits in the queue
    second = asyncio.ensure_future(batcher.submit(2, caller="a"))
    await asyncio.sleep(0)
    second.cancel()
    assert (await first)[0] == (1, 2)
    await asyncio.sleep(0.06)
    assert [2] not in run.batches
    await batcher.close()


async def test_close_fails_queued_and_refuses_new_work():
    run = Recorder(delay_s=0.05)
    batcher = DynamicBatcher(run, max_batch=1, max_delay_s=0.0, concurrency=2)
    running = asyncio.ensure_future(batcher.submit(1, caller="a"))
    also_running = asyncio.ensure_future(batcher.submit(2, caller="a"))
    next_up = asyncio.ensure_future(batcher.submit(3, caller="a"))  # a full batch: waits in the executor
    queued = asyncio.ensure_future(batcher.submit(4, caller="a"))
    await asyncio.sleep(0.01)
    await batcher.close()
    assert (await running)[0] == (1, 2)  # in-flight work finishes: every batch handed to the backend
    assert (await also_running)[0] == (2, 4)
    assert (await next_up)[0] == (3, 6)
    with pytest.raises(UnavailableError):
        await queued
    with pytest.raises(UnavailableError):
        await batcher.submit(3, caller="a")


async def test_queue_time_runs_until_the_backend_starts_the_batch():
    """A batch waits in the batcher's queue while one runs; its queue_s ends when the backend starts it."""
    run = Recorder(delay_s=0.1)
    batcher = DynamicBatcher(run, max_batch=1, max_delay_s=0.0)
    calls = [asyncio.ensure_future(batcher.submit(i, caller="a")) for i in range(3)]
    await asyncio.sleep(0.03)
    assert batcher.queued == 1  # one runs, one (a full batch) waits in the executor behind it, one in the queue
    results = await asyncio.gather(*calls)
    assert [r[0] for r in results] == [(i, 2 * i) for i in range(3)]
    assert results[1][1].queue_s >= 0.09 and results[2][1].queue_s >= 0.19, [info for _, info in results]
    await batcher.close()


def test_bad_concurrency_is_refused():
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), concurrency=0)

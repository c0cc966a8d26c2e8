"""run_stream: in-order answers, the window, latest-frame-wins dropping, and errors in their place."""

import asyncio

import pytest

from facetwin.server.errors import InvalidInputError
from facetwin.server.streams import DROPPED, run_stream


class SlowSquare:
    """A real async swap stand-in: squares numbers after a delay, recording concurrency."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.active = 0
        self.peak = 0
        self.started: list[int] = []

    async def __call__(self, job: int) -> int:
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.started.append(job)
        try:
            await asyncio.sleep(self.delay_s)
            return job * job
        finally:
            self.active -= 1


async def frames_of(jobs, gap_s: float = 0.0):
    for i, job in enumerate(jobs):
        if gap_s:
            await asyncio.sleep(gap_s)
        yield i, job


async def collect(agen):
    return [item async for item in agen]


async def test_queue_answers_every_frame_in_order_within_the_window():
    swap = SlowSquare(0.005)
    out = await collect(run_stream(frames_of(range(30)), swap, window=4, policy="queue"))
    assert out == [(i, i * i) for i in range(30)]
    assert 1 < swap.peak <= 4


async def test_latest_drops_waiting_frames_but_answers_all_in_order():
    swap = SlowSquare(0.02)
    out = await collect(run_stream(frames_of(range(40), gap_s=0.001), swap, window=2, policy="latest"))
    assert [frame_id for frame_id, _ in out] == list(range(40))  # every frame answered, in order
    dropped = [frame_id for frame_id, result in out if result is DROPPED]
    done = [frame_id for frame_id, result in out if result is not DROPPED]
    assert dropped, "a producer 20x faster than the swap must see drops"
    assert done[-1] == 39, "the newest frame always wins"
    assert all(result == frame_id ** 2 for frame_id, result in out if result is not DROPPED)
    assert swap.peak <= 2 and sorted(swap.started) == done


async def test_invalid_frame_fails_in_its_place():
    swap = SlowSquare(0.001)
    jobs = [1, 2, InvalidInputError("bad pixels"), 4]
    seen = []
    with pytest.raises(InvalidInputError, match="^frame 2: bad pixels$"):
        async for item in run_stream(frames_of(jobs), swap, window=4):
            seen.append(item)
    assert seen == [(0, 1), (1, 4)]


async def test_empty_stream_is_invalid():
    with pytest.raises(InvalidInputError, match="no frames"):
        await collect(run_stream(frames_of([]), SlowSquare(0), window=2))


async def test_unknown_policy_is_invalid():
    with pytest.raises(InvalidInputError, match="policy"):
        await collect(run_stream(frames_of([1]), SlowSquare(0), window=2, policy="fastest"))

"""StreamRun: in-order answers, the window, latest-frame-wins dropping, per-frame errors, idle and drain endings."""

import asyncio

import pytest

from facetwin.server.errors import (
    DeadlineExceededError,
    InvalidInputError,
    NotFoundError,
    SwapError,
    UnavailableError,
)
from facetwin.server.limits import FrameMemory
from facetwin.server.streams import DROPPED, ERROR, OK, StreamRun


class SlowSquare:
    """A real async swap stand-in: squares numbers after a delay, recording concurrency."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.active = 0
        self.peak = 0
        self.started: list[int] = []

    async def __call__(self, job):
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.started.append(job)
        try:
            await asyncio.sleep(self.delay_s)
            if job == "missing":
                raise NotFoundError("no such target")
            if job == "bug":
                raise ZeroDivisionError("a bug")
            return job * job
        finally:
            self.active -= 1


class Frames:
    """An async frame source that records how far it has been read (what push-back is about)."""

    def __init__(self, jobs, gap_s: float = 0.0, hang_after: int | None = None):
        self.jobs, self.gap_s, self.hang_after = list(jobs), gap_s, hang_after
        self.read = 0

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for i, job in enumerate(self.jobs):
            if self.hang_after is not None and i >= self.hang_after:
                await asyncio.sleep(3600)
            if self.gap_s:
                await asyncio.sleep(self.gap_s)
            self.read += 1
            yield i, job


async def collect(run: StreamRun):
    return [answer async for answer in run.answers()]


async def test_a_bug_reading_frames_ends_the_stream_with_it_after_the_frames_taken():
    async def frames():
        yield 0, 3
        raise RuntimeError("a bug reading the next message")

    answers = []
    with pytest.raises(RuntimeError, match="a bug reading"):  # the interceptor answers it INTERNAL, and logs it
        async for answer in StreamRun(frames(), SlowSquare(0.001), window=4).answers():
            answers.append((answer.frame_id, answer.status, answer.outcome))
    assert answers == [(0, OK, 9)]


async def test_queue_answers_every_frame_in_order_within_the_window():
    swap = SlowSquare(0.005)
    out = await collect(StreamRun(aiter(Frames(range(30))), swap, window=4, policy="queue"))
    assert [(a.frame_id, a.status, a.outcome) for a in out] == [(i, OK, i * i) for i in range(30)]
    assert 1 < swap.peak <= 4


async def test_queue_stops_reading_while_the_window_is_full():
    swap = SlowSquare(0.2)
    frames = Frames(range(50))
    run = StreamRun(aiter(frames), swap, window=4, policy="queue")
    answers = run.answers()
    first = await anext(answers)
    assert first.frame_id == 0
    # While the first four frames ran, the stream read at most the window plus one waiting for room.
    assert frames.read <= 4 + 1 + 4  # + the frames that entered once the first ones finished
    await answers.aclose()


async def test_a_caller_that_stops_reading_answers_holds_at_most_a_window_of_them():
    """A finished answer holds its image until it is sent: frames started and not sent count against the window,
    so a caller that reads no answers stops the stream from swapping (and reading) more."""
    swap = SlowSquare(0.001)
    frames = Frames(range(200))
    answers = StreamRun(aiter(frames), swap, window=4, policy="queue").answers()
    assert (await anext(answers)).frame_id == 0
    await asyncio.sleep(0.3)  # the caller reads nothing more for a while: all 200 would be done long before
    assert len(swap.started) <= 1 + 4 and frames.read <= 1 + 4 + 1 + 4 * 4
    rest = [answer.frame_id async for answer in answers]
    assert rest == list(range(1, 200))


async def test_latest_drops_waiting_frames_but_answers_all_in_order():
    swap = SlowSquare(0.02)
    out = await collect(StreamRun(aiter(Frames(range(40), gap_s=0.001)), swap, window=2, policy="latest"))
    assert [a.frame_id for a in out] == list(range(40))  # every frame answered, in order
    dropped = [a.frame_id for a in out if a.status == DROPPED]
    done = [a.frame_id for a in out if a.status == OK]
    assert dropped, "a producer 20x faster than the swap must see drops"
    assert done[-1] == 39, "the newest frame always wins"
    assert all(a.outcome == a.frame_id ** 2 for a in out if a.status == OK)
    assert swap.peak <= 2 and sorted(swap.started) == done


async def test_bad_frames_are_answered_in_their_place_and_the_stream_goes_on():
    swap = SlowSquare(0.001)
    jobs = [1, 2, InvalidInputError("bad pixels"), "missing", "bug", 6]
    out = await collect(StreamRun(aiter(Frames(jobs)), swap, window=4))
    assert [a.status for a in out] == [OK, OK, ERROR, ERROR, ERROR, OK]
    assert str(out[2].error) == "bad pixels" and isinstance(out[3].error, NotFoundError)
    assert type(out[4].error) is SwapError and "ZeroDivisionError" in str(out[4].error)  # INTERNAL, no traceback
    assert out[5].outcome == 36


async def test_admission_reads_on_only_once_a_frame_is_admitted_and_releases_every_admitted_frame():
    """admit() stands for the frame memory, with room for one frame: while one runs, the next waits to be admitted
    and the stream reads nothing more; a frame refused admission is answered with its error in its place."""
    memory = FrameMemory(1)
    released: list[int] = []
    frames = Frames([0, 1, 2, 3, 4])

    async def admit(job):
        if job == 3:
            raise DeadlineExceededError("frame 3 waited too long")
        claim = memory.claim(1)
        await claim.wait()

        def release():
            claim.release()
            released.append(job)
        return job, release

    answers = StreamRun(aiter(frames), SlowSquare(0.1), window=4, policy="queue", admit=admit).answers()
    first = asyncio.ensure_future(anext(answers))
    await asyncio.sleep(0.05)
    assert frames.read == 2 and memory.waiting == 1  # frame 0 runs, frame 1 waits, frame 2 is not read yet
    out = [await first] + [answer async for answer in answers]
    assert [(a.frame_id, a.status) for a in out] == [(0, OK), (1, OK), (2, OK), (3, ERROR), (4, OK)]
    assert "frame 3 waited" in str(out[3].error) and out[4].outcome == 16
    assert sorted(released) == [0, 1, 2, 4] and memory.held == 0


async def test_latest_admits_one_frame_at_a_time_and_drops_it_for_a_newer_one_while_it_waits():
    """The frame memory has room for one frame: while frame 0 runs, each newer frame takes the place of the one
    waiting for memory (dropped), so the stream holds one waiting frame, the newest, which runs next."""
    memory = FrameMemory(1)
    released: list[int] = []
    most_waiting = 0

    async def admit(job):
        nonlocal most_waiting
        claim = memory.claim(1)
        most_waiting = max(most_waiting, memory.waiting)
        try:
            await claim.wait()
        except BaseException:
            claim.release()
            raise

        def release():
            claim.release()
            released.append(job)
        return job, release

    swap = SlowSquare(0.15)
    out = await collect(StreamRun(aiter(Frames(range(6), gap_s=0.01)), swap, window=2, policy="latest",
                                  admit=admit))
    assert [(a.frame_id, a.status) for a in out] == [(0, OK)] + [(i, DROPPED) for i in range(1, 5)] + [(5, OK)]
    assert swap.started == [0, 5] and sorted(released) == [0, 5]
    assert most_waiting == 1 and memory.held == 0 and memory.waiting == 0


async def test_admitted_frames_are_released_when_the_stream_is_cut_off():
    released = []

    async def admit(job):
        return job, lambda: released.append(job)

    answers = StreamRun(aiter(Frames(range(3))), SlowSquare(5.0), window=4, policy="queue", admit=admit).answers()
    first = asyncio.ensure_future(anext(answers))
    await asyncio.sleep(0.05)  # every frame admitted and running
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await answers.aclose()
    await asyncio.sleep(0)  # done callbacks run on the next turn of the loop
    assert sorted(released) == [0, 1, 2]


async def test_empty_stream_is_invalid():
    with pytest.raises(InvalidInputError, match="no frames"):
        await collect(StreamRun(aiter(Frames([])), SlowSquare(0), window=2))


async def test_unknown_policy_is_invalid():
    with pytest.raises(InvalidInputError, match="policy"):
        StreamRun(aiter(Frames([1])), SlowSquare(0), window=2, policy="fastest")


async def test_an_idle_stream_ends_after_answering_what_it_took():
    out = []
    with pytest.raises(DeadlineExceededError, match="no frame for 0.2 s"):
        async for answer in StreamRun(aiter(Frames(range(5), hang_after=3)), SlowSquare(0.01), window=2,
                                      idle_timeout_s=0.2).answers():
            out.append(answer.frame_id)
    assert out == [0, 1, 2]


async def test_a_draining_server_answers_every_frame_taken_then_says_reconnect():
    stop = asyncio.Event()
    swap = SlowSquare(0.05)
    frames = Frames(range(1000), gap_s=0.005)
    out = []
    with pytest.raises(UnavailableError, match="reconnect"):
        async for answer in StreamRun(aiter(frames), swap, window=4, stop=stop).answers():
            out.append(answer)
            if answer.frame_id == 2:
                stop.set()
    assert [a.frame_id for a in out] == list(range(frames.read))  # every frame read was answered, none lost
    assert all(a.status == OK for a in out) and frames.read < 1000

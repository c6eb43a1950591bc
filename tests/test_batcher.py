"""featshard.tools.serve.batcher: concurrent submissions share one `process` call, bounded queue, timeouts, failures."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from featshard.tools.serve.batcher import Batcher, Overloaded


def run(coro):
    return asyncio.run(coro)


def test_concurrent_submissions_are_batched_up_to_max_batch():
    calls: list[list[int]] = []

    def process(items: list[int]) -> list[int]:
        calls.append(list(items))
        time.sleep(0.05)  # a forward pass: the next submissions queue meanwhile
        return [x * 10 for x in items]

    async def main() -> list[int]:
        b = Batcher(process, max_batch=4, max_wait_s=0.02, max_queue=64)
        try:
            return await asyncio.gather(*(b.submit(i, timeout=10) for i in range(10)))
        finally:
            assert b.stats.submitted == 10 and b.stats.processed == 10
            assert b.stats.batches == len(calls) and b.stats.max_batch_seen == 4
            await b.stop()

    assert run(main()) == [i * 10 for i in range(10)]  # each caller gets its own result, in its own order
    assert sorted(x for c in calls for x in c) == list(range(10))
    assert max(len(c) for c in calls) == 4 and len(calls) == 3  # 10 submissions, 3 forward passes


def test_a_lone_submission_waits_at_most_max_wait():
    async def main() -> float:
        b = Batcher(lambda xs: xs, max_batch=32, max_wait_s=0.05, max_queue=4)
        try:
            t = time.monotonic()
            assert await b.submit("x", timeout=5) == "x"
            return time.monotonic() - t
        finally:
            await b.stop()

    assert 0.04 <= run(main()) < 2.0


def test_full_queue_is_refused_not_grown():
    gate = threading.Event()

    def process(items: list[int]) -> list[int]:
        gate.wait(5)
        return items

    async def main() -> None:
        b = Batcher(process, max_batch=1, max_wait_s=0, max_queue=2)
        try:
            first = asyncio.ensure_future(b.submit(0, timeout=10))
            await asyncio.sleep(0.05)  # 0 is in the model now; 1 and 2 fill the queue
            waiting = [asyncio.ensure_future(b.submit(i, timeout=10)) for i in (1, 2)]
            await asyncio.sleep(0.01)
            with pytest.raises(Overloaded):
                await b.submit(3, timeout=10)
            assert b.stats.rejected == 1
            gate.set()
            assert await first == 0 and [await w for w in waiting] == [1, 2]
        finally:
            gate.set()
            await b.stop()

    run(main())


def test_timed_out_submission_is_dropped_before_the_model():
    seen: list[list[str]] = []
    gate = threading.Event()

    def process(items: list[str]) -> list[str]:
        seen.append(list(items))
        gate.wait(5)
        return items

    async def main() -> None:
        b = Batcher(process, max_batch=8, max_wait_s=0, max_queue=8)
        try:
            busy = asyncio.ensure_future(b.submit("busy", timeout=10))
            await asyncio.sleep(0.05)
            with pytest.raises(asyncio.TimeoutError):
                await b.submit("late", timeout=0.05)
            gate.set()
            assert await busy == "busy"
            assert await b.submit("next", timeout=5) == "next"
        finally:
            gate.set()
            await b.stop()
        assert seen == [["busy"], ["next"]] and b.stats.dropped == 1

    run(main())


def test_a_failing_batch_fails_its_callers_and_the_batcher_goes_on():
    def process(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("bad batch")
        return items

    async def main() -> None:
        b = Batcher(process, max_batch=1, max_wait_s=0, max_queue=8)
        try:
            with pytest.raises(ValueError, match="bad batch"):
                await b.submit(13, timeout=5)
            assert await b.submit(1, timeout=5) == 1
        finally:
            await b.stop()

    run(main())


def test_wrong_result_count_is_an_error_not_a_mismatch():
    async def main() -> None:
        b = Batcher(lambda xs: xs[:-1], max_batch=1, max_wait_s=0, max_queue=8)
        try:
            with pytest.raises(RuntimeError, match="0 results for 1"):
                await b.submit(1, timeout=5)
        finally:
            await b.stop()

    run(main())


@pytest.mark.parametrize("kw", [{"max_batch": 0}, {"max_queue": 0}, {"max_wait_s": -1}])
def test_bad_limits_are_refused(kw):
    args = {"max_batch": 2, "max_wait_s": 0.0, "max_queue": 2, **kw}
    with pytest.raises(ValueError):
        Batcher(lambda xs: xs, **args)

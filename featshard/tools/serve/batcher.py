"""Micro-batching for the server: concurrent requests share one forward pass.

`Batcher.submit(payload, timeout)` queues one payload and awaits its result. One asyncio task takes the first waiting
payload, then more until `max_batch` are together or `max_wait_s` has passed since the first (a few ms), and hands the
list to `process` (one call, e.g. one forward pass + one faiss search) on a single-thread executor; while that runs,
new payloads queue and form the next batch at once. The queue is bounded (`max_queue`): a full queue raises
`Overloaded` (the server answers 503) instead of growing. A payload whose caller gave up (timeout, disconnect) is
dropped before it reaches `process`. `stats()` counts submissions, batches (forward passes) and the largest batch.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import asdict, dataclass
from typing import Callable, Generic, TypeVar

log = logging.getLogger("featshard.tools.serve.batcher")

P = TypeVar("P")
R = TypeVar("R")


class Overloaded(Exception):
    """The queue is full: the caller should answer 503 and let the client retry."""


@dataclass
class BatchStats:
    submitted: int = 0
    processed: int = 0
    batches: int = 0
    max_batch_seen: int = 0
    rejected: int = 0
    dropped: int = 0  # callers that gave up before their batch ran

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class Batcher(Generic[P, R]):
    """Bounded-wait micro-batcher; create and use it inside one running event loop."""

    def __init__(self, process: Callable[[list[P]], list[R]], max_batch: int, max_wait_s: float,
                 max_queue: int) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1, max_wait_s >= 0")
        self.process, self.max_batch, self.max_wait_s = process, max_batch, max_wait_s
        self.queue: asyncio.Queue[tuple[P, asyncio.Future[R]]] = asyncio.Queue(maxsize=max_queue)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="featshard-model")
        self.stats = BatchStats()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="featshard-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, payload: P, timeout: float) -> R:
        """The result of `process` for this payload; Overloaded when the queue is full, TimeoutError past timeout."""
        self.start()
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((payload, fut))
        except asyncio.QueueFull:
            self.stats.rejected += 1
            raise Overloaded(f"{self.queue.maxsize} requests are already waiting for the model") from None
        self.stats.submitted += 1
        return await asyncio.wait_for(fut, timeout)  # cancels fut on timeout: _run then skips it

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect(loop)
            live = [(p, f) for p, f in batch if not f.done()]
            self.stats.dropped += len(batch) - len(live)
            if not live:
                continue
            self.stats.batches += 1
            self.stats.processed += len(live)
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(live))
            try:
                results = await loop.run_in_executor(self.executor, self.process, [p for p, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"process returned {len(results)} results for {len(live)} payloads")
            except Exception as exc:  # noqa: BLE001 - every waiting caller gets the failure, the loop goes on
                log.exception("batch of %d failed", len(live))
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(live, results):
                if not fut.done():
                    fut.set_result(result)

    async def _collect(self, loop: asyncio.AbstractEventLoop) -> list[tuple[P, asyncio.Future[R]]]:
        """The first waiting payload, then every other one that arrives within max_wait_s, up to max_batch."""
        batch = [await self.queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

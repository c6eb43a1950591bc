"""The worker's batch loop: batches submitted one ahead, results taken one batch late, chunks written behind.

`ShardLoop.run` pulls a batch from the loader, submits it to the extractor (`Extractor.submit`: on a GPU the input
preparation, the model and the copy back are queued and the call returns), then takes the previous batch's
features (`Pending.result`): the device works on batch k while the host fetches, decodes or submits batch k+1. A
finished chunk goes to a `ChunkWriter`, a background thread with a bounded queue that writes it atomically
(temp file, fsync, rename: a chunk file exists only when complete) while the loop goes on; a write error fails the
shard from the loop with the writer's own WriteError, and a chunk still queued when the shard stops is written first
(it is complete). At most one finished chunk is being written while the next fills, so a kill at any instant loses
at most that chunk and the one being filled (the progress file counts rows as they are taken, as before, and is
rewritten when a chunk file is on disk). On a CPU the extractor computes at once and the same loop runs.

Stage seconds (`stages`): `wait_first`/`wait_data` the loop waited for the loader, `write` it waited for the writer
(queue full, or the last chunks at the end), `write_busy` the writer thread's own time, `loop` the wall time after
the first batch arrived (the steady state: everything above overlaps inside it); the extractor adds `decode`, `h2d`
and `model` (device time).
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from featshard.extract.extractor import Extractor, Pending
from featshard.extract.batch import Batch
from featshard.store import shards
from featshard.store.progress import Progress

log = logging.getLogger("featshard.runner.pipeline")
WRITER_DEPTH = 1  # finished chunks handed to the writer and not yet on disk: bounds memory and what a kill loses


class ChunkBuffer:
    """Accumulates one chunk's batches; knows when the chunk is whole."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.blocks: list[tuple[Batch, np.ndarray]] = []
        self.count = 0

    def add(self, batch: Batch, feats: np.ndarray) -> None:
        self.blocks.append((batch, feats))
        self.count += batch.size

    @property
    def full(self) -> bool:
        return self.count >= self.hi - self.lo

    @property
    def counts(self) -> tuple[int, int]:
        """(ok rows, failed rows)."""
        return sum(len(b.rows) for b, _ in self.blocks), sum(len(b.failed_rows) for b, _ in self.blocks)

    def to_block(self, dim: int, dtype: str) -> shards.Block:
        feats = [f for _, f in self.blocks if len(f)]
        return shards.Block(
            rows=np.array([r for b, _ in self.blocks for r in b.rows], np.int64),
            names=[n for b, _ in self.blocks for n in b.names],
            features=np.concatenate(feats).astype(dtype) if feats else np.zeros((0, dim), dtype),
            failed_rows=np.array([r for b, _ in self.blocks for r in b.failed_rows], np.int64),
            failed_names=[n for b, _ in self.blocks for n in b.failed_names],
            failed_reasons=[r for b, _ in self.blocks for r in b.failed_reasons],
        )


class ChunkWriter:
    """Writes finished chunks in order on a background thread. At most `depth` chunks are handed over and not yet on
    disk: `put` waits for a free slot (default 1: the loop fills chunk k+1 while chunk k is written). The first
    failure stops the writing: the chunks after it are dropped (never written out of order) and `put`/`close` raise
    that failure in the caller's thread."""

    _END = object()

    def __init__(self, write: Callable[[ChunkBuffer], None], depth: int = WRITER_DEPTH, name: str = "") -> None:
        self._write, self._slots = write, threading.Semaphore(depth)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done: deque[tuple[int, int]] = deque()
        self.error: BaseException | None = None
        self.busy = 0.0  # seconds the thread spent writing
        self.blocked = 0.0  # seconds callers waited for a free slot or for the last write
        self._thread = threading.Thread(target=self._run, name=f"featshard-writer {name}".strip(), daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            buf = self._queue.get()
            if buf is self._END:
                return
            try:
                if self.error is None:
                    t = time.monotonic()
                    self._write(buf)
                    self.busy += time.monotonic() - t
                    self._done.append(buf.counts)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                self.error = exc
            finally:
                self._slots.release()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, buf: ChunkBuffer) -> None:
        t = time.monotonic()
        try:
            while not self._slots.acquire(timeout=0.2):
                self._check()
                if not self._thread.is_alive():
                    raise RuntimeError("the chunk writer thread died")
            self._check()
            self._queue.put(buf)
        finally:
            self.blocked += time.monotonic() - t

    def durable(self) -> Iterator[tuple[int, int]]:
        """(ok, failed) rows of each chunk written since the last call."""
        while self._done:
            yield self._done.popleft()

    def close(self) -> None:
        """Write what was handed over, stop the thread; raise the first write failure."""
        t = time.monotonic()
        if self._thread.is_alive():
            self._queue.put(self._END)
            self._thread.join()
        self.blocked += time.monotonic() - t
        self._check()

    def abandon(self, timeout: float = 60.0) -> None:
        """The shard failed or was stopped: write what was handed over (complete chunks) within `timeout`, keep
        quiet about a write failure (the shard's own error is the one to report)."""
        if self._thread.is_alive():
            self._queue.put(self._END)
            self._thread.join(timeout)
        if self.error is not None:
            log.debug("chunk writer: %s", self.error)


class ShardLoop:
    """One shard's pending chunks through the extractor; see the module docstring."""

    def __init__(self, extractor: Extractor, chunks: list[tuple[int, int]], write: Callable[[ChunkBuffer], None],
                 stages: dict[str, float], progress: Progress, name: str = "") -> None:
        self.extractor, self.stages, self.progress = extractor, stages, progress
        self.chunks = iter(chunks)
        self.buf = ChunkBuffer(*next(self.chunks))
        self.writer = ChunkWriter(write, name=name)
        self.processed = 0
        for key in ("wait_first", "wait_data", "write", "write_busy", "loop"):
            stages.setdefault(key, 0.0)

    def run(self, loader: Iterable[Batch]) -> int:
        """Every batch of `loader` extracted and its chunk written; returns the rows processed."""
        self.progress.restart_clock()
        inflight: tuple[Batch, Pending] | None = None
        started = 0.0
        finished = False
        try:
            for batch in self._timed(iter(loader)):
                started = started or time.monotonic()
                submitted = (batch, self.extractor.submit(batch, self.stages))
                if inflight is not None:
                    self._take(*inflight)
                inflight = submitted
            started = started or time.monotonic()
            if inflight is not None:
                self._take(*inflight)
            self.writer.close()
            finished = True
        finally:
            if not finished:
                self.writer.abandon()
                with contextlib.suppress(OSError):  # the disk that failed the shard may fail this too
                    self._report()
            else:
                self._report()
            self.stages["write"] += self.writer.blocked
            self.stages["write_busy"] += self.writer.busy
            self.stages["loop"] += time.monotonic() - started if started else 0.0
        return self.processed

    def _timed(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """The loader's batches; the time spent waiting for each booked as wait_first (the first: loaders starting,
        pipeline fill) or wait_data."""
        first = True
        while True:
            t = time.monotonic()
            batch = next(batches, None)
            waited = time.monotonic() - t
            self.stages["wait_first" if first else "wait_data"] += waited
            if batch is None:
                return
            log.debug("batch of %d after %.3f s", batch.size, waited)
            first = False
            yield batch

    def _take(self, batch: Batch, pending: Pending) -> None:
        """A batch's features (waiting for the device if needed) into its chunk; a whole chunk to the writer (once
        it has a free slot), then the batch counted as done."""
        self.buf.add(batch, pending.result())
        while self.buf.full:
            self.writer.put(self.buf)
            nxt = next(self.chunks, None)
            if nxt is None:
                break
            self.buf = ChunkBuffer(*nxt)
        self.processed += batch.size
        self.progress.add(len(batch.rows), len(batch.failed_rows))
        self._report()

    def _report(self) -> None:
        """The progress file rewritten at once when a chunk file got on disk."""
        if any(True for _ in self.writer.durable()):
            self.progress.set(force=True)

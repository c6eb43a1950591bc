"""`BatchStream`: the loader's batches of a shard's pending chunks, in order, surviving a loader that stalls or dies."""
from __future__ import annotations

import itertools
import logging
import signal
from typing import Any, Iterator

from featshard.extract.loader import Batch, ChunkBatches, make_loader
from featshard.extract.preprocess import Preprocess
from featshard.store.inputs import InputSource

log = logging.getLogger("featshard.stream")


class BatchStream:
    """The loader's batches of a shard's pending chunks, in order, surviving a loader that stalls or dies.

    A stall (no batch within the loader's timeout) is a read that no signal ends, e.g. on a hard-mounted network file
    system that hung, where the per-image deadline cannot fire: the batch the loader was on is recorded as failed
    (`timeout`) and a fresh loader goes on after it; the stuck process is abandoned (nothing ends a read the kernel
    will not end). A loader process that dies (out of memory, a crashing decoder) is replaced and its batch tried
    again once; if the loader dies on it again, that batch is recorded as failed (`error`)."""

    def __init__(self, name: str, source: InputSource, pending: list[tuple[int, int]], prep: Preprocess,
                 batch_size: int, workers: int, pin: bool, device_decode: bool = False) -> None:
        self.name, self.source, self.pending, self.prep = name, source, pending, prep
        self.batch_size, self.workers, self.pin, self.device_decode = batch_size, workers, pin, device_decode
        self.delivered = 0
        self.died_at = -1
        self._started: Iterator[Any] | None = None

    def start(self) -> "BatchStream":
        """Start the loader processes now (they fork from this process, so before the model makes it big) and let
        them decode the first batches while the model loads."""
        if self._started is None:
            self._started = self._new_loader()
        return self

    def _new_loader(self) -> Iterator[Any]:
        """A loader (its processes started) over the batches not yet delivered."""
        return iter(make_loader(_Skip(self._batches(), self.delivered), self.prep, self.workers, self.pin,
                                self.device_decode))

    def _batches(self) -> ChunkBatches:
        return ChunkBatches(self.source, self.pending, self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                batches = self._started if self._started is not None else self._new_loader()
                self._started = None  # a loader that died or stalled is replaced by a fresh one
                for batch in _LoaderDeaths(batches):
                    self.delivered += 1
                    yield batch
                return
            except (RuntimeError, ConnectionError, EOFError) as exc:
                # ConnectionError / EOFError: a batch a dying loader was handing over (its fd transfer broke)
                stalled = isinstance(exc, RuntimeError) and "timed out" in str(exc)
                died = not isinstance(exc, RuntimeError) or "DataLoader worker" in str(exc)
                if not (stalled or died):
                    raise
                if died and self.died_at != self.delivered:
                    self.died_at = self.delivered
                    log.warning("%s: %s; starting a new loader", self.name, exc)
                    continue
                yield self._lost(str(exc), "timeout" if stalled else "error")

    def _lost(self, why: str, reason: str) -> Batch:
        """The batch the loader was on, as failures (retry them later with --retry-failed)."""
        import torch

        items = next(iter(_Skip(self._batches(), self.delivered)))
        self.delivered += 1
        text = f"{reason}: the loader gave up on this batch of {len(items)} ({why}); retry with --retry-failed"
        log.error("%s: rows %d..%d recorded as failed, starting a new loader: %s", self.name,
                  items[0].row, items[-1].row, why)
        return Batch([], [], torch.zeros((0, 0, 0, 3), dtype=torch.uint8), [i.row for i in items],
                     [i.name for i in items], [text] * len(items))


class _LoaderDeaths:
    """Iterates a DataLoader so that a loader process's death is reported by the batch fetch, never elsewhere:
    torch's SIGCHLD handler raises "DataLoader worker ... killed" wherever this thread happens to be (in the model,
    writing a chunk); while no fetch runs, the error is kept and raised by the next one."""

    def __init__(self, batches: Iterator[Any]) -> None:
        import threading

        self.batches, self.fetching, self.pending = batches, False, None
        self.torch_handler = signal.getsignal(signal.SIGCHLD)  # installed by torch when the iterator was made
        self.active = callable(self.torch_handler) and threading.current_thread() is threading.main_thread()
        if self.active:
            signal.signal(signal.SIGCHLD, self._on_child)

    def _on_child(self, signum: int, frame: Any) -> None:
        try:
            self.torch_handler(signum, frame)
        except RuntimeError as exc:
            if self.fetching:
                raise
            self.pending = exc

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                if self.pending is not None:
                    raise self.pending
                self.fetching = True
                try:
                    batch = next(self.batches, None)
                finally:
                    self.fetching = False
                if batch is None:
                    return
                yield batch
        finally:
            if self.active:
                signal.signal(signal.SIGCHLD, self.torch_handler)


class _Skip:
    """A re-iterable of batches without the first `n`."""

    def __init__(self, batches: Any, n: int) -> None:
        self.batches, self.n = batches, n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.batches), self.n, None)

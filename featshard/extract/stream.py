"""`BatchStream`: the loader's batches of a shard's pending chunks, in order, surviving a loader that stalls or dies,
and failing the shard (never recording bad images) when the loader machinery itself fails."""
from __future__ import annotations

import bisect
import itertools
import logging
import signal
from collections import Counter
from typing import Any, Iterator

from featshard.errors import FeatshardError
from featshard.extract.batch import Batch
from featshard.extract.loader import PREFETCH, ChunkBatches, make_loader
from featshard.extract.preprocess import Preprocess
from featshard.store.inputs import InputSource

log = logging.getLogger("featshard.stream")
SHM_HINT = ("/dev/shm is full: give the container more shared memory (docker run --shm-size=16g ...; Kubernetes: an "
            "emptyDir with medium: Memory at /dev/shm), or lower --batch-size / --loader-workers")


class LoaderFault(FeatshardError):
    """The loading machinery failed (an exception in collate or in a loader process, a full /dev/shm, a chunk lost
    whole to one infrastructure reason): a fault of the machine, not of the images, so the shard fails with the
    traceback and finished chunks stay; nothing is recorded as a bad image."""


class BatchStream:
    """The loader's batches of a shard's pending chunks, in order, surviving a loader that stalls or dies.

    A stall (no batch within the loader's timeout) is a read that no signal ends, e.g. on a hard-mounted network file
    system that hung, where the per-image deadline cannot fire: the batch the loader was on is recorded as failed
    (`timeout`) and a fresh loader goes on after it; the stuck process is abandoned (nothing ends a read the kernel
    will not end). A loader process that dies (out of memory, a crashing decoder) is replaced and its batch tried
    again once; if the loader dies on it again, that batch is recorded as failed (`error`).

    What is not about one image fails the shard (`LoaderFault`) instead: an exception raised in a loader process
    outside the per-image decode (collate, a full /dev/shm, ...), a dead pin-memory thread, and a chunk whose rows all
    failed with one infrastructure reason (see `ChunkWatch`)."""

    def __init__(self, name: str, source: InputSource, pending: list[tuple[int, int]], prep: Preprocess,
                 batch_size: int, workers: int, pin: bool, device_decode: bool = False,
                 prefetch: int = PREFETCH) -> None:
        self.name, self.source, self.pending, self.prep = name, source, pending, prep
        self.batch_size, self.workers, self.pin, self.device_decode = batch_size, workers, pin, device_decode
        self.prefetch = prefetch
        self.delivered = 0
        self.died_at = -1
        self.watch = ChunkWatch(name, pending)
        self._started: _LoaderDeaths | None = None

    def start(self) -> "BatchStream":
        """Start the loader processes now (they fork from this process, so before the model makes it big) and let
        them decode the first batches while the model loads. A loader process that dies meanwhile is reported by the
        first fetch, not inside the model build (torch's SIGCHLD handler would raise wherever this process is)."""
        if self._started is None:
            self._started = _LoaderDeaths(self._new_loader())
        return self

    def _new_loader(self) -> Iterator[Any]:
        """A loader (its processes started) over the batches not yet delivered."""
        return iter(make_loader(_Skip(self._batches(), self.delivered), self.prep, self.workers, self.pin,
                                self.device_decode, self.prefetch))

    def _batches(self) -> ChunkBatches:
        return ChunkBatches(self.source, self.pending, self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        for batch in self._supervised():
            self.watch.check(batch)
            yield batch

    def _supervised(self) -> Iterator[Any]:
        while True:
            deaths: _LoaderDeaths | None = None
            try:
                deaths = self._started if self._started is not None else _LoaderDeaths(self._new_loader())
                self._started = None  # a loader that died or stalled is replaced by a fresh one
                for batch in deaths:
                    self.delivered += 1
                    yield batch
                return
            except Exception as exc:  # noqa: BLE001 - classified below; what is not a stall or a death propagates
                kind = classify(exc)
                if kind == "fault":
                    raise LoaderFault(fault_message(self.name, exc)) from exc
                if kind is None:
                    raise
                if kind == "died":
                    # else torch reports the dead process again, to the next loader's fetch
                    _shut_down(deaths.batches if deaths is not None else None)
                if kind == "died" and self.died_at != self.delivered:
                    self.died_at = self.delivered
                    log.warning("%s: %s; starting a new loader", self.name, exc)
                    continue
                yield self._lost(str(exc), "timeout" if kind == "stalled" else "error")

    def _lost(self, why: str, reason: str) -> Batch:
        """The batch the loader was on, as failures (retry them later with --retry-failed)."""
        import torch

        items = next(iter(_Skip(self._batches(), self.delivered)))
        self.delivered += 1
        text = f"{reason}: {GAVE_UP} of {len(items)} ({why}); retry with --retry-failed"
        log.error("%s: rows %d..%d recorded as failed, starting a new loader: %s", self.name,
                  items[0].row, items[-1].row, why)
        return Batch([], [], torch.zeros((0, 0, 0, 3), dtype=torch.uint8), [i.row for i in items],
                     [i.name for i in items], [text] * len(items))


GAVE_UP = "the loader gave up on this batch"


def classify(exc: BaseException) -> str | None:
    """What an exception out of the DataLoader means: "stalled" (no batch within its timeout), "died" (a loader
    process vanished, or the batch it was handing over broke), "fault" (an exception inside a loader process that is
    not an image's: each image's own errors are caught and recorded by DecodeDataset; or the pin-memory thread died),
    None (anything else: not the loader's)."""
    text = str(exc)
    if "in DataLoader worker process" in text or "Pin memory thread exited" in text:  # torch's ExceptionWrapper
        return "fault"
    if isinstance(exc, RuntimeError) and "DataLoader timed out" in text:
        return "stalled"
    if isinstance(exc, (ConnectionError, EOFError)):  # a batch a dying loader was handing over (its fd transfer)
        return "died"
    if isinstance(exc, RuntimeError) and "DataLoader worker" in text:  # "... (pid N) is killed by signal" / "exited"
        return "died"
    return None


def fault_message(name: str, exc: BaseException) -> str:
    text = str(exc)
    hint = f" {SHM_HINT}." if "No space left on device" in text and "shm" in text.lower() else ""
    return (f"{name}: the loader failed (not an image: every image's own error is recorded per row), so the shard "
            f"fails and its finished chunks are kept; rerun the same command to resume.{hint} "
            f"{type(exc).__name__}: {text}")


def infra_key(reason: str) -> str | None:
    """The infrastructure class of a recorded failure reason (None for what is about the image itself: missing,
    not_image, corrupt, ...): `timeout`, and `error` by exception type (or a batch the loader gave up on)."""
    cls, _, rest = reason.partition(": ")
    if cls == "timeout":
        return "timeout"
    if cls == "error":
        return "error: " + ("loader" if rest.startswith(GAVE_UP) else rest.partition(":")[0])
    return None


class ChunkWatch:
    """Fails the shard when every row of a chunk (of 2 rows or more) failed with one infrastructure reason: a hung
    mount, a loader that keeps dying, a decoder library that fails on everything are faults to fix and rerun, not a
    chunk of bad images to record. Checked before the chunk's last batch is handed on, so the chunk is never
    written."""

    def __init__(self, name: str, pending: list[tuple[int, int]]) -> None:
        self.name, self.chunks = name, sorted(pending)
        self.starts = [lo for lo, _ in self.chunks]
        self.seen: dict[int, int] = {}
        self.keys: dict[int, Counter[str | None]] = {}
        self.example: dict[int, str] = {}

    def check(self, batch: Batch) -> None:
        rows = batch.rows or batch.failed_rows
        if not rows:
            return
        i = bisect.bisect_right(self.starts, rows[0]) - 1
        lo, hi = self.chunks[i]
        self.seen[i] = self.seen.get(i, 0) + batch.size
        keys = self.keys.setdefault(i, Counter())
        keys.update([None] * len(batch.rows) + [infra_key(r) for r in batch.failed_reasons])
        if batch.failed_reasons:
            self.example.setdefault(i, batch.failed_reasons[0])
        if self.seen[i] < hi - lo:
            return
        del self.seen[i], self.keys[i]
        key, count = next(iter(keys.items())) if len(keys) == 1 else (None, 0)
        if key is not None and count >= 2:
            raise LoaderFault(
                f"{self.name}: every row of chunk [{lo}, {hi}) failed with the same infrastructure reason ({key}), "
                f"e.g. {self.example.get(i)!r}: a fault of the machine (file system, loader), not {count} bad images, "
                "so the shard fails instead of recording them; its finished chunks are kept: rerun the same command "
                "to resume once it is fixed")


class _LoaderDeaths:
    """Iterates a DataLoader so that a loader process's death is reported by the batch fetch, never elsewhere:
    torch's SIGCHLD handler raises "DataLoader worker ... killed" wherever this thread happens to be (in the model,
    writing a chunk); while no fetch runs, the error is kept and raised by the next one."""

    def __init__(self, batches: Iterator[Any]) -> None:
        import threading

        self.batches, self.fetching = batches, False
        self.pending: RuntimeError | None = None
        self.torch_handler: Any = signal.getsignal(signal.SIGCHLD)  # installed by torch with the iterator
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


def _shut_down(batches: Iterator[Any] | None) -> None:
    """Shut a loader down after one of its processes died: its other processes stop, and torch forgets its process
    ids (its SIGCHLD handler checks every registered loader: one death would be reported twice otherwise, the second
    time as a death of the replacement loader). A stalled loader is left alone: a process stuck in a read that the
    kernel will not end cannot be stopped, and waiting for it would stall this shard too."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception as exc:  # noqa: BLE001 - best effort: the replacement loader is what matters
            log.debug("shutting the dead loader down: %s", exc)


class _Skip:
    """A re-iterable of batches without the first `n`."""

    def __init__(self, batches: Any, n: int) -> None:
        self.batches, self.n = batches, n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.batches), self.n, None)

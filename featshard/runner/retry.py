"""What to do again: the resume state of a shard (finished chunks, stale temp files), going on after a loader
that stalled or died (`BatchStream`), and `run --retry-failed`.

Resume: a chunk file that exists, opens, says complete and has the run's fingerprint is done; anything else is
redone. Temp files (`*.tmp-<pid>`) are what a killed writer leaves; they are removed when the shard starts again.

`--retry-failed` processes again only the rows a shard recorded as failed (e.g. a network mount came back). The
failed rows of a finished shard file, or of the finished chunk files of an unfinished shard, are few: they are
collected, decoded and run through the model once, then each file is rewritten atomically (temp + fsync + rename).
A row that now succeeds moves from `failed_*` into `rows`/`names`/`features` at its place (`rows` stays ascending);
a row that still fails keeps its place with the new reason. The file is streamed: only the retried rows' features
are held in memory. A kill at any instant leaves every file either as it was or fully rewritten.
"""
from __future__ import annotations

import itertools
import logging
import os
import signal
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np

from featshard.store import shards
from featshard.store.inputs import Item, iter_items
from featshard.store.plan import chunk_ranges
from featshard.store.progress import progress_path

log = logging.getLogger("featshard.runner.retry")
STREAM_ROWS = 16384  # rows of an existing file copied per step


def clean_stale(spec: Any) -> None:
    """Remove what a killed writer of this shard may have left: torn `*.tmp-<pid>` files; the chunk folder of a
    shard whose file is complete (killed between the final rename and the clean-up)."""
    name, run_dir = spec.shard.name, spec.run_dir
    final = shards.shard_path(run_dir, name)
    parts = shards.parts_dir(run_dir, name)
    stale = [*final.parent.glob(f"{name}.h5.tmp-*"), *progress_path(run_dir, name).parent.glob(
        f"{name}.progress.json.tmp-*"), *(parts.glob("*.tmp-*") if parts.is_dir() else [])]
    for path in stale:
        log.info("removing %s, left by an interrupted write", path)
        path.unlink(missing_ok=True)
    if parts.is_dir() and shards.is_complete(final):
        shards.remove_tree(parts)


def chunk_usable(path: Path, fingerprint: str | None) -> bool:
    """A chunk file counts as done when it opens, says complete and has this run's fingerprint."""
    if not path.is_file():
        return False
    try:
        attrs = shards.read_attrs(path)
    except (OSError, KeyError):
        attrs = {}
    ok = bool(attrs.get("complete")) and (fingerprint is None or attrs.get("fingerprint") == fingerprint)
    if not ok:
        log.warning("%s is unreadable, incomplete or from another config: redoing that chunk", path)
    return ok


def durable_chunks(spec: Any) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(finished, pending) chunk ranges of an unfinished shard, from the chunk files on disk."""
    chunks = chunk_ranges(spec.shard.start, spec.shard.stop, spec.chunk_size)
    fp = spec.attrs.get("fingerprint")
    done = {c for c in chunks if chunk_usable(shards.chunk_path(spec.run_dir, spec.shard.name, *c), fp)}
    return [c for c in chunks if c in done], [c for c in chunks if c not in done]


def durable_rows(spec: Any) -> int:
    """Rows of this shard already on disk: all of them for a complete shard file, else those of finished chunks."""
    if shards.is_complete(shards.shard_path(spec.run_dir, spec.shard.name)):
        return spec.shard.rows
    done, _ = durable_chunks(spec)
    return sum(hi - lo for lo, hi in done)


class BatchStream:
    """The loader's batches of a shard's pending chunks, in order, surviving a loader that stalls or dies.

    A stall (no batch within the loader's timeout) is a read that no signal ends, e.g. on a hard-mounted network file
    system that hung, where the per-image deadline cannot fire: the batch the loader was on is recorded as failed
    (`timeout`) and a fresh loader goes on after it; the stuck process is abandoned (nothing ends a read the kernel
    will not end). A loader process that dies (out of memory, a crashing decoder) is replaced and its batch tried
    again once; if the loader dies on it again, that batch is recorded as failed (`error`)."""

    def __init__(self, spec: Any, pending: list[tuple[int, int]], pin: bool, device_decode: bool = False) -> None:
        self.spec, self.pending, self.pin, self.device_decode = spec, pending, pin, device_decode
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
        from featshard.extract.loader import make_loader

        return iter(make_loader(_Skip(self._batches(), self.delivered), self.spec.prep, self.spec.loader_workers,
                                self.pin, self.device_decode))

    def _batches(self) -> Any:
        from featshard.extract.loader import ChunkBatches

        return ChunkBatches(self.spec.source, self.pending, self.spec.batch_size)

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
                    log.warning("%s: %s; starting a new loader", self.spec.shard.name, exc)
                    continue
                yield self._lost(str(exc), "timeout" if stalled else "error")

    def _lost(self, why: str, reason: str) -> Any:
        """The batch the loader was on, as failures (retry them later with --retry-failed)."""
        import torch

        from featshard.extract.loader import Batch

        items = next(iter(_Skip(self._batches(), self.delivered)))
        self.delivered += 1
        text = f"{reason}: the loader gave up on this batch of {len(items)} ({why}); retry with --retry-failed"
        log.error("%s: rows %d..%d recorded as failed, starting a new loader: %s", self.spec.shard.name,
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


def retry_targets(spec: Any) -> list[Path]:
    """The files whose failures are retried: the shard file when complete, else its finished chunk files."""
    final = shards.shard_path(spec.run_dir, spec.shard.name)
    if shards.is_complete(final):
        return [final]
    done, _ = durable_chunks(spec)
    return [shards.chunk_path(spec.run_dir, spec.shard.name, lo, hi) for lo, hi in done]


def failed_rows_of(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as h5:
        return h5["failed_rows"][...].astype(np.int64)


def retry_failed(spec: Any, get_extractor: Callable[[], Any], stages: dict[str, float],
                 write: Callable[[Path, Callable[[], Any]], Any]) -> tuple[int, int]:
    """Retry the failed rows of this shard's finished files; returns (rows retried, rows now with a feature)."""
    targets = [(path, failed_rows_of(path)) for path in retry_targets(spec)]
    targets = [(path, rows) for path, rows in targets if len(rows)]
    wanted = np.unique(np.concatenate([rows for _, rows in targets])) if targets else np.zeros(0, np.int64)
    if not len(wanted):
        return 0, 0
    log.info("%s: retrying %d failed rows", spec.shard.name, len(wanted))
    outcome = extract_rows(spec, get_extractor(), list(items_for_rows(spec.source, wanted)), stages)
    recovered = 0
    for path, _ in targets:
        recovered += write(path, lambda path=path: rewrite_file(path, outcome))
    log.info("%s: %d of %d retried rows now have a feature; %d still fail", spec.shard.name, recovered,
             len(wanted), len(wanted) - recovered)
    return len(wanted), recovered


def items_for_rows(source: Any, rows: np.ndarray) -> Iterator[Item]:
    """The input items of the given (sorted) rows, streaming the list once over their span."""
    wanted = set(int(r) for r in rows)
    for item in iter_items(source, int(rows[0]), int(rows[-1]) + 1):
        if item.row in wanted:
            yield item


def extract_rows(spec: Any, extractor: Any, items: list[Item],
                 stages: dict[str, float]) -> dict[int, np.ndarray | str]:
    """row -> feature vector (float32) or the failure reason, for the given items."""
    from featshard.extract.loader import make_loader
    from featshard.runner.worker import run_model

    batches = [items[i: i + spec.batch_size] for i in range(0, len(items), spec.batch_size)]
    loader = make_loader(batches, spec.prep, min(spec.loader_workers, len(batches)),
                         pin=str(extractor.device).startswith("cuda"),
                         device_decode=getattr(extractor, "device_decode", False))
    outcome: dict[int, np.ndarray | str] = {}
    for batch in loader:
        feats = run_model(extractor, batch, stages)
        outcome.update({int(r): f for r, f in zip(batch.rows, feats)})
        outcome.update({int(r): str(reason) for r, reason in zip(batch.failed_rows, batch.failed_reasons)})
    return outcome


def rewrite_file(path: Path, outcome: dict[int, np.ndarray | str]) -> int:
    """Rewrite one shard or chunk file with the retry outcome, atomically; returns rows moved to features."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with h5py.File(path, "r") as src:
        f_rows = src["failed_rows"][...].astype(np.int64)
        f_names = list(src["failed_names"].asstr()[...])
        f_reasons = list(src["failed_reasons"].asstr()[...])
        dim, dtype = int(src["features"].shape[1]), src["features"].dtype
        fixed = [i for i, r in enumerate(f_rows) if isinstance(outcome.get(int(r)), np.ndarray)]
        new = (f_rows[fixed], [f_names[i] for i in fixed],
               np.asarray([outcome[int(f_rows[i])] for i in fixed], dtype).reshape(-1, dim))
        moved = set(fixed)
        still = [i for i in range(len(f_rows)) if i not in moved]
        with h5py.File(tmp, "w") as out:
            for key, value in src.attrs.items():
                out.attrs[key] = value
            out.attrs["complete"] = False
            _create_datasets(out, dim, dtype, int(src["rows"].shape[0]) + len(fixed))
            _merge_features(src, out, *new)
            _append(out["failed_rows"], f_rows[still])
            _append(out["failed_names"], [f_names[i] for i in still])
            _append(out["failed_reasons"], [_reason(outcome.get(int(f_rows[i])), f_reasons[i]) for i in still])
            out.attrs["complete"] = True
    shards.atomic_replace(tmp, str(path))
    return len(fixed)


def _reason(new: np.ndarray | str | None, old: str) -> str:
    return shards.clean_text(new) if isinstance(new, str) else old


def _create_datasets(out: h5py.File, dim: int, dtype: Any, total: int) -> None:
    for name in ("names", "failed_names", "failed_reasons"):
        out.create_dataset(name, shape=(0,), maxshape=(None,), dtype=shards.STR, chunks=True)
    for name in ("rows", "failed_rows"):
        out.create_dataset(name, shape=(0,), maxshape=(None,), dtype=np.int64, chunks=True)
    out.create_dataset("features", shape=(0, dim), maxshape=(None, dim), dtype=dtype,
                       chunks=(max(1, min(1024, total)), dim))


def _merge_features(src: h5py.File, out: h5py.File, new_rows: np.ndarray, new_names: list[str],
                    new_feats: np.ndarray) -> None:
    """Stream src's rows/names/features into out, inserting the new (sorted, disjoint) rows at their places."""
    n, j = int(src["rows"].shape[0]), 0
    for lo in range(0, n, STREAM_ROWS):
        hi = min(n, lo + STREAM_ROWS)
        rows = src["rows"][lo:hi].astype(np.int64)
        k = int(np.searchsorted(new_rows, rows[-1])) if hi < n else len(new_rows)
        _append_sorted(out, rows, list(src["names"].asstr()[lo:hi]), src["features"][lo:hi],
                       new_rows[j:k], new_names[j:k], new_feats[j:k])
        j = k
    if j < len(new_rows):  # src had no feature rows
        _append_sorted(out, new_rows[:0], [], new_feats[:0], new_rows[j:], new_names[j:], new_feats[j:])


def _append_sorted(out: h5py.File, rows: np.ndarray, names: list[str], feats: np.ndarray, add_rows: np.ndarray,
                   add_names: list[str], add_feats: np.ndarray) -> None:
    all_rows = np.concatenate([rows, add_rows])
    order = np.argsort(all_rows, kind="stable")
    all_names = [*names, *(shards.clean_text(x) for x in add_names)]
    _append(out["rows"], all_rows[order])
    _append(out["names"], [all_names[i] for i in order])
    _append(out["features"], np.concatenate([feats, add_feats.astype(feats.dtype)])[order])


def _append(ds: h5py.Dataset, data: Any) -> None:
    if len(data) == 0:
        return
    n = ds.shape[0]
    ds.resize(n + len(data), axis=0)
    ds[n:] = data

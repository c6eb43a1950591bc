"""`run --retry-failed`: process again only the rows a shard recorded as failed (e.g. a network mount came back).

The failed rows of a finished shard file, or of the finished chunk files of an unfinished shard, are few: they are
collected, decoded and run through the model once, then each file is rewritten atomically by
`featshard.store.shardedit.rewrite_file` (a row that now succeeds moves into `rows`/`features` at its place).
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np

from featshard.extract.extractor import Extractor
from featshard.runner.shardspec import ShardSpec
from featshard.runner.resume import durable_chunks
from featshard.store import shards
from featshard.store.inputs import InputSource, Item, iter_items
from featshard.store.rundir import RunDir
from featshard.store.shardedit import rewrite_file

log = logging.getLogger("featshard.retryfailed")


def retry_targets(spec: ShardSpec) -> list[Path]:
    """The files whose failures are retried: the shard file when complete, else its finished chunk files."""
    final = RunDir(spec.run_dir).shard(spec.shard.name)
    if shards.is_complete(final):
        return [final]
    done, _ = durable_chunks(spec)
    return [RunDir(spec.run_dir).chunk(spec.shard.name, lo, hi) for lo, hi in done]


def failed_rows_of(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as h5:
        return h5["failed_rows"][...].astype(np.int64)


def retry_failed(spec: ShardSpec, get_extractor: Callable[[], Extractor], stages: dict[str, float],
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
        recovered += write(path, functools.partial(rewrite_file, path, outcome))
    log.info("%s: %d of %d retried rows now have a feature; %d still fail", spec.shard.name, recovered,
             len(wanted), len(wanted) - recovered)
    return len(wanted), recovered


def items_for_rows(source: InputSource, rows: np.ndarray) -> Iterator[Item]:
    """The input items of the given (sorted) rows, streaming the list once over their span."""
    wanted = set(int(r) for r in rows)
    for item in iter_items(source, int(rows[0]), int(rows[-1]) + 1):
        if item.row in wanted:
            yield item


def extract_rows(spec: ShardSpec, extractor: Extractor, items: list[Item],
                 stages: dict[str, float]) -> dict[int, np.ndarray | str]:
    """row -> feature vector (float32) or the failure reason, for the given items."""
    batches = [items[i: i + spec.batch_size] for i in range(0, len(items), spec.batch_size)]
    outcome: dict[int, np.ndarray | str] = {}
    for batch in extractor.loader(batches, min(spec.loader_workers, len(batches))):
        feats = extractor.features(batch, stages)
        outcome.update({int(r): f for r, f in zip(batch.rows, feats)})
        outcome.update({int(r): str(reason) for r, reason in zip(batch.failed_rows, batch.failed_reasons)})
    return outcome

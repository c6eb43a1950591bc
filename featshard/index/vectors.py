"""A run's stored feature vectors as the index reads them: `Source` (a run, its shards and its id offset in the
index), `check_source` (refuses missing, incomplete or foreign shards), and bounded-memory reading: `iter_vectors`
streams every stored row, `sample_positions` + `gather` pick a seeded sample, one HDF5 batch at a time."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from featshard.errors import FeatshardError
from featshard.store.manifest import load_manifest
from featshard.store.plan import shard_name
from featshard.store.rundir import RunDir
from featshard.store.shards import iter_features, read_attrs

BATCH_BYTES = 64 << 20  # working set of one streamed batch of vectors
MAX_CHUNKS_PER_READ = 4096


def batch_rows_for(dim: int) -> int:
    """Rows per streamed batch: about BATCH_BYTES of float32, at least 1024."""
    return max(1024, BATCH_BYTES // (4 * max(1, dim)))


def read_rows(path: Path, batch_rows: int) -> int:
    """batch_rows, lowered so one read touches at most MAX_CHUNKS_PER_READ HDF5 chunks: HDF5 spends ~8 KB per
    chunk of a selection, so a 64 MB read of a shard stored in 1-row chunks would cost ~400 MB of RSS."""
    import h5py

    with h5py.File(path, "r") as h5:
        chunks = h5["features"].chunks
    return min(batch_rows, max(1, chunks[0] if chunks else batch_rows) * MAX_CHUNKS_PER_READ)


@dataclass(frozen=True)
class ShardRef:
    """One shard of a source run: its file and the input rows [start, stop) the plan gave it."""

    name: str
    path: Path
    start: int
    stop: int


@dataclass
class Source:
    """A run whose vectors are in the index: ids [id_offset, id_offset + rows) are its rows."""

    run_dir: Path
    fingerprint: str
    id_offset: int
    rows: int
    dim: int
    shards: list[ShardRef] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # stored feature rows per shard, once checked

    def to_meta(self, index_run: Path) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir.resolve()),
            "relpath": os.path.relpath(self.run_dir.resolve(), index_run.resolve()),
            "fingerprint": self.fingerprint,
            "id_offset": self.id_offset,
            "rows": self.rows,
            "stored": int(sum(self.counts)),
        }


def source_of(run_dir: str | os.PathLike[str], id_offset: int = 0) -> Source:
    """Describe a run from its manifest (no shard is opened)."""
    run = Path(run_dir)
    manifest = load_manifest(run)
    try:
        plan = manifest["plan"]
        shards = [
            ShardRef(n, RunDir(run).shard(n), int(s["start"]), int(s["stop"]))
            for s in plan
            for n in [shard_name(int(s["index"]), int(s["count"]))]
        ]
        return Source(run, str(manifest["fingerprint"]), id_offset, int(manifest["rows"]),
                      int(manifest["model"]["dim"]), shards)
    except (KeyError, TypeError, ValueError) as exc:
        raise FeatshardError(f"{run}/manifest.json lacks {exc} (plan, fingerprint, rows, model.dim)") from exc


def check_source(src: Source) -> Source:
    """Refuse shards that are missing, incomplete, of another fingerprint or dimension; record stored counts."""
    src.counts = [_check_shard(src, ref) for ref in src.shards]
    return src


def _check_shard(src: Source, ref: ShardRef) -> int:
    import h5py

    where = f"shard {ref.name} of {src.run_dir} ({ref.path})"
    if not ref.path.is_file():
        if ref.start == ref.stop:
            return 0
        raise FeatshardError(f"{where} is missing: the run has not finished it; rerun `featshard run` to complete it")
    try:
        attrs = read_attrs(ref.path)
        with h5py.File(ref.path, "r") as h5:
            count = int(h5["rows"].shape[0])
    except (OSError, KeyError) as exc:
        raise FeatshardError(f"{where} cannot be read: {exc}") from exc
    if not attrs.get("complete", False):
        raise FeatshardError(f"{where} is incomplete (complete=false): finish the run before merging")
    if str(attrs.get("fingerprint")) != src.fingerprint:
        raise FeatshardError(f"{where} has fingerprint {attrs.get('fingerprint')!r} but the manifest says "
                             f"{src.fingerprint!r}: it was made with another model or config; re-extract it")
    if int(attrs.get("dim", src.dim)) != src.dim:
        raise FeatshardError(f"{where} has dim {attrs.get('dim')} but the manifest says {src.dim}")
    return count


def iter_vectors(sources: Sequence[Source], batch_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (ids int64, vectors float32) of every stored row of every source, one shard batch at a time."""
    for src in sources:
        for ref in src.shards:
            if not ref.path.is_file() and ref.start == ref.stop:
                continue
            for rows, feats in iter_features(ref.path, read_rows(ref.path, batch_rows)):
                yield rows.astype(np.int64) + src.id_offset, np.ascontiguousarray(feats, dtype=np.float32)


def sample_positions(total: int, size: int, seed: int) -> np.ndarray:
    """`size` distinct global positions drawn uniformly (seeded) from [0, total), sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=min(size, total), replace=False))


def gather(sources: Sequence[Source], positions: np.ndarray, batch_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids and vectors at sorted global positions (over the stored rows of all sources, in stream order),
    filled into one preallocated array. Dense selections stream each shard once; sparse ones read just their rows.
    """
    dim = sources[0].dim if sources else 0
    ids_out, vec_out = np.empty(len(positions), np.int64), np.empty((len(positions), dim), np.float32)
    filled = base = 0
    for src in sources:
        if len(src.counts) != len(src.shards):
            check_source(src)
        for ref, count in zip(src.shards, src.counts):
            lo, hi = np.searchsorted(positions, [base, base + count])
            local = positions[lo:hi] - base
            base += count
            pieces = _dense(ref.path, local, batch_rows) if len(local) * 16 > count else _sparse(ref.path, local)
            for rows, feats in pieces:
                ids_out[filled:filled + len(rows)] = rows + src.id_offset
                vec_out[filled:filled + len(rows)] = feats
                filled += len(rows)
    return ids_out[:filled], vec_out[:filled]


def _sparse(path: Path, local: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    import h5py

    if not len(local):
        return
    with h5py.File(path, "r") as h5:
        for piece in np.array_split(local, max(1, len(local) // MAX_CHUNKS_PER_READ)):
            yield h5["rows"][piece].astype(np.int64), h5["features"][piece]


def _dense(path: Path, local: np.ndarray, batch_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    lo = 0
    for rows, feats in iter_features(path, read_rows(path, batch_rows)):
        a, b = np.searchsorted(local, [lo, lo + len(rows)])
        pick = local[a:b] - lo
        lo += len(rows)
        if len(pick):
            yield rows[pick].astype(np.int64), np.asarray(feats[pick], np.float32)

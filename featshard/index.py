"""The index a run's `merge` writes, and the public API to use it: `load_index`, `LoadedIndex`, `stored_ids`.

`DIR/index/index.faiss` is a faiss index whose ids are input row numbers (plus a per-source offset once `add` has
put another run's vectors in it); `DIR/index/index.json` describes it: spec, metric, ntotal, dim, the tuned search
parameters (nprobe / efSearch), the measured recall@10, and `sources`, the runs whose vectors it holds, each with its
`id_offset`: id = id_offset + row of that run. `LoadedIndex.lookup` maps ids back to (name, run_dir, row) through the
shards of the source runs. An `--on-disk` index keeps its inverted lists in `DIR/index/index-<stamp>.ivfdata`
(a fresh name per build, so swapping index.faiss stays atomic), opened memory-mapped, plus `trained.faiss`, the
trained empty index that `add` fills new parts from.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from featshard.errors import FeatshardError, UsageError
from featshard.manifest import load_manifest
from featshard.plan import shard_name
from featshard.shards import iter_features, names_for_rows, read_attrs, shard_path

log = logging.getLogger("featshard.index")

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
METRICS = ("ip", "l2")
BATCH_BYTES = 64 << 20  # working set of one streamed batch of vectors
MAX_CHUNKS_PER_READ = 4096
PLATEAU = 0.002  # recall gains below this for two steps in a row end the tuning sweep


def index_dir(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / "index"


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


def faiss_metric(metric: str) -> int:
    import faiss

    if metric not in METRICS:
        raise UsageError(f"--metric must be one of {', '.join(METRICS)}, not {metric!r}")
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


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
            ShardRef(n, shard_path(run, n), int(s["start"]), int(s["stop"]))
            for s in plan
            for n in [shard_name(int(s["index"]), int(s["count"]))]
        ]
        return Source(run, str(manifest["fingerprint"]), id_offset, int(manifest["rows"]),
                      int(manifest["model"]["dim"]), shards)
    except (KeyError, TypeError, ValueError) as exc:
        raise FeatshardError(f"{run}/manifest.json lacks {exc} (plan, fingerprint, rows, model.dim)") from exc


def _source_from_meta(entry: dict[str, Any], index_run: Path, first: bool) -> Source:
    """The first source is the run that holds the index; others by absolute path, then relative to it."""
    if first:
        run = index_run.resolve()
    else:
        run = Path(entry["run_dir"])
        if not (run / "manifest.json").is_file():
            run = (index_run / entry.get("relpath", entry["run_dir"])).resolve()
    src = source_of(run, int(entry["id_offset"]))
    if src.fingerprint != entry["fingerprint"]:
        raise FeatshardError(f"source run {run} has fingerprint {src.fingerprint}, the index was built from "
                             f"{entry['fingerprint']}: the run changed since; rebuild the index with `featshard merge`")
    return src


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


def unwrap(index: Any) -> Any:
    """The innermost index under IDMap / PreTransform / Refine wrappers (downcast)."""
    import faiss

    index = faiss.downcast_index(index)
    while True:
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
            index = faiss.downcast_index(index.index)
        else:
            return index


def is_exact(index: Any) -> bool:
    """A brute-force index (Flat, maybe under an IDMap): its results are exact, recall is 1 by construction."""
    import faiss

    top = faiss.downcast_index(index)
    while isinstance(top, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        top = faiss.downcast_index(top.index)
    return isinstance(top, faiss.IndexFlat)


def stored_ids(index: Any) -> np.ndarray:
    """Every id in the index (int64, unsorted): the IDMap's id table, or the ids of all IVF inverted lists."""
    import faiss

    top = faiss.downcast_index(index)
    if isinstance(top, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.vector_to_array(top.id_map).astype(np.int64)
    ivf = faiss.try_extract_index_ivf(top)
    if ivf is None:
        return np.arange(top.ntotal, dtype=np.int64)  # sequential ids: an index without an id map
    invlists, out = ivf.invlists, []
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if size:
            ptr = invlists.get_ids(lst)
            try:
                out.append(faiss.rev_swig_ptr(ptr, size).copy())
            finally:
                invlists.release_ids(lst, ptr)
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def apply_params(index: Any, params: dict[str, Any]) -> None:
    """Set search parameters (nprobe, efSearch, ...) through the wrappers with faiss.ParameterSpace."""
    import faiss

    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, float(value) if isinstance(value, float) else int(value))


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux ru_maxrss is in KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def default_max_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total // 2)


def tunable(index: Any) -> tuple[str | None, list[int]]:
    """The search parameter that trades speed for recall, with its candidate values in increasing cost."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return "nprobe", [2**i for i in range(int(math.log2(max(1, ivf.nlist))) + 1)] + (
            [int(ivf.nlist)] if ivf.nlist & (ivf.nlist - 1) else [])
    if isinstance(unwrap(index), faiss.IndexHNSW):
        return "efSearch", [16, 32, 64, 128, 256, 512, 1024, 2048]
    return None, []


def exact_knn(queries: np.ndarray, sources: Sequence[Source], k: int, metric: str) -> np.ndarray:
    """Exact top-k ids of queries over every stored vector, streaming shard batches (never all vectors)."""
    import faiss

    heap = faiss.ResultHeap(len(queries), k, keep_max=metric == "ip")
    for ids, vecs in iter_vectors(sources, batch_rows_for(queries.shape[1])):
        dist, pos = faiss.knn(queries, vecs, min(k, len(vecs)), metric=faiss_metric(metric))
        heap.add_result(dist, np.where(pos >= 0, ids[np.maximum(pos, 0)], -1))
    heap.finalize()
    return heap.I


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (truth without -1 padding)."""
    hits = [len(set(f[f >= 0]) & set(t[t >= 0])) / max(1, int((t >= 0).sum())) for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 1.0


def tune(index: Any, sources: Sequence[Source], metric: str, target: float, seed: int,
         queries: int = 1000, k: int = 10) -> dict[str, Any]:
    """Measure recall@k on stored vectors used as queries; raise nprobe/efSearch until it reaches the target
    (or stops improving: a PQ index's codes cap its recall whatever nprobe is)."""
    started = time.perf_counter()
    if is_exact(index):
        return {"search_params": {}, "recall_at_10": 1.0, "recall_target": target, "recall_note": "exact index",
                "recall_queries": 0, "tune_seconds": 0.0}
    positions = sample_positions(sum(sum(s.counts) for s in sources), queries, seed + 1)
    _, q = gather(sources, positions, batch_rows_for(index.d))
    truth = exact_knn(q, sources, k, metric)
    name, candidates = tunable(index)
    best, stale = (-1.0, None), 0
    for value in candidates or [None]:
        if name:
            apply_params(index, {name: value})
        score = recall_at(index.search(q, k)[1], truth)
        stale = 0 if score > best[0] + PLATEAU else stale + 1
        best = (score, value) if score > best[0] + 1e-9 else best
        if score >= target or stale >= 2:
            break
    if best[0] < target:
        log.warning("recall@%d %.3f stays below the target %.3f for this index", k, best[0], target)
    params = {name: best[1]} if name else {}
    apply_params(index, params)
    return {"search_params": params, "recall_at_10": round(best[0], 4), "recall_target": target,
            "recall_queries": len(q), "tune_seconds": round(time.perf_counter() - started, 3)}


def read_meta(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = index_dir(run_dir) / META_FILE
    if not path.is_file() or not (index_dir(run_dir) / INDEX_FILE).is_file():
        raise FeatshardError(f"{run_dir} has no index: run `featshard merge {run_dir}` first")
    return json.loads(path.read_text(encoding="utf-8"))


@contextlib.contextmanager
def faiss_stdout_to_stderr() -> Iterator[None]:
    """faiss's on-disk code printf()s to stdout; keep stdout clean for --json output while it runs."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def read_index_file(run_dir: str | os.PathLike[str], meta: dict[str, Any]) -> Any:
    """Read index.faiss; an on-disk index memory-maps (read-only) its .ivfdata found next to it.

    faiss's OnDiskInvertedLists always mmap their .ivfdata; IO_FLAG_MMAP must not be added here (with on-disk
    lists it means "skip the IVF data" in faiss 1.15 and searching then crashes).
    """
    import faiss

    flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY if meta.get("on_disk") else 0
    with faiss_stdout_to_stderr():
        index = faiss.read_index(str(index_dir(run_dir) / INDEX_FILE), flags)
    if index.ntotal != meta.get("ntotal"):
        raise FeatshardError(f"{index_dir(run_dir)}: index.faiss holds {index.ntotal} vectors but index.json says "
                             f"{meta.get('ntotal')}; an interrupted merge/add? rerun `featshard merge {run_dir}`")
    apply_params(index, meta.get("search_params") or {})
    return index


@dataclass
class LoadedIndex:
    """An index with its search parameters applied and the sources to name its ids."""

    run_dir: Path
    index: Any
    meta: dict[str, Any]
    sources: list[Source]

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query; id -1 where fewer than k vectors exist."""
        q = np.ascontiguousarray(np.asarray(queries, np.float32).reshape(-1, self.dim))
        return self.index.search(q, int(k))

    def lookup(self, ids: Sequence[int] | np.ndarray) -> list[tuple[str | None, str | None, int]]:
        """(name, run_dir, row) per id; (None, None, -1) for -1, (None, run_dir, row) for an unknown row."""
        ids = np.asarray(ids, np.int64).ravel()
        out: list[tuple[str | None, str | None, int]] = [(None, None, -1)] * len(ids)
        offsets = np.array([s.id_offset for s in self.sources], np.int64)
        for (si, shard_i), positions in _group_ids(ids, offsets, self.sources).items():
            src = self.sources[si]
            ref = src.shards[shard_i]
            rows = ids[positions] - src.id_offset
            order = np.argsort(rows, kind="stable")
            names = names_for_rows(ref.path, rows[order]) if ref.path.is_file() else [None] * len(rows)
            for pos, row, name in zip(positions[order], rows[order], names):
                out[int(pos)] = (name, str(src.run_dir), int(row))
        return out


def _group_ids(ids: np.ndarray, offsets: np.ndarray, sources: list[Source]) -> dict[tuple[int, int], np.ndarray]:
    """Positions of ids grouped by (source, shard) through the id offsets and the plans' row ranges."""
    groups: dict[tuple[int, int], list[int]] = {}
    order = np.argsort(offsets)
    for pos, i in enumerate(ids):
        if i < 0:
            continue
        k = int(np.searchsorted(offsets[order], i, side="right")) - 1
        if k < 0:
            continue
        si = int(order[k])
        src = sources[si]
        row = int(i) - src.id_offset
        starts = [s.start for s in src.shards]
        j = int(np.searchsorted(starts, row, side="right")) - 1
        if 0 <= row < src.rows and j >= 0 and row < src.shards[j].stop:
            groups.setdefault((si, j), []).append(pos)
    return {key: np.asarray(val, np.int64) for key, val in groups.items()}


def load_index(run_dir: str | os.PathLike[str]) -> LoadedIndex:
    """Open DIR/index (memory-mapped when built --on-disk) with its tuned search parameters applied."""
    run = Path(run_dir)
    meta = read_meta(run)
    index = read_index_file(run, meta)
    entries = meta.get("sources") or []
    sources = [_source_from_meta(e, run, i == 0) for i, e in enumerate(entries)]
    return LoadedIndex(run, index, meta, sources)

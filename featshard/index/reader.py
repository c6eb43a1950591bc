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

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from featshard.errors import FeatshardError
from featshard.store.rundir import RunDir
from featshard.index.faissutil import apply_params, faiss_stdout_to_stderr
from featshard.store.shards import names_for_rows
from featshard.index.vectors import Source, source_of



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


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux ru_maxrss is in KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def default_max_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total // 2)


def read_meta(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    paths = RunDir(run_dir)
    path = paths.index_meta
    if not path.is_file() or not paths.index_file.is_file():
        raise FeatshardError(f"{run_dir} has no index: run `featshard merge {run_dir}` first")
    return json.loads(path.read_text(encoding="utf-8"))


def read_index_file(run_dir: str | os.PathLike[str], meta: dict[str, Any]) -> Any:
    """Read index.faiss; an on-disk index memory-maps (read-only) its .ivfdata found next to it.

    faiss's OnDiskInvertedLists always mmap their .ivfdata; IO_FLAG_MMAP must not be added here (with on-disk
    lists it means "skip the IVF data" in faiss 1.15 and searching then crashes).
    """
    import faiss

    flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY if meta.get("on_disk") else 0
    with faiss_stdout_to_stderr():
        index = faiss.read_index(str(RunDir(run_dir).index_file), flags)
    if index.ntotal != meta.get("ntotal"):
        raise FeatshardError(f"{RunDir(run_dir).index}: index.faiss holds {index.ntotal} vectors but index.json says "
                             f"{meta.get('ntotal')}; an interrupted merge/add? rerun `featshard merge {run_dir}`")
    apply_params(index, meta.get("search_params") or {})
    return index


@dataclass
class IndexInfo:
    """What `merge` and `add` return: the index.json of DIR/index, with its main facts as attributes."""

    run_dir: str
    spec: str
    metric: str
    ntotal: int
    dim: int
    recall: float
    search_params: dict[str, int | float]
    on_disk: bool
    meta: dict[str, Any]

    @classmethod
    def from_meta(cls, run_dir: str | os.PathLike[str], meta: dict[str, Any]) -> "IndexInfo":
        return cls(str(run_dir), str(meta["spec"]), str(meta.get("metric", "ip")), int(meta["ntotal"]),
                   int(meta["dim"]), float(meta.get("recall_at_10", 1.0)), dict(meta.get("search_params") or {}),
                   bool(meta.get("on_disk")), meta)


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

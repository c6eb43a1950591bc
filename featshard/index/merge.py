"""`featshard merge DIR`: stream a run's shards into one faiss index `DIR/index/index.faiss` (+ `index.json`).

Vectors are read shard by shard, one bounded batch at a time, and added with `add_with_ids` (id = input row), so
memory holds the index itself plus one batch. Shards that are missing, incomplete or of another fingerprint are
refused. Approximate specs are trained on a sample drawn uniformly (seeded) over all stored rows of all shards,
then filled by streaming; their recall@10 is measured against exact search and nprobe / efSearch tuned to
`--target-recall`.

`--index-spec auto` uses the memory it is given, `--max-index-memory` M (default: half of this machine's RAM),
for the most faithful index of the N d-dim vectors that fits in M (sizes as featshard.index.autospec estimates them:
the index file, which is also its memory once loaded):
  1. N < 100,000 and a Flat index (N x (4d + 48) bytes with its id map) fits M  ->  `Flat` (exact);
  2. otherwise an IVF index with k lists, k the power of two nearest 4·sqrt(N) (at most N/39 so every list gets 39
     training points), an HNSW32 coarse quantizer once k >= 16384 (`IVF{k}_HNSW32`), and the first vector code of
     this ladder that fits (each costs its bytes plus an 8-byte id per vector, plus the centroids):
       Flat (4d bytes), SQ8 (d), SQ6 (3d/4), PQ{d/2} (d/2: 2-dim sub-vectors of 8 bits; SQ4 for odd d),
       PQ{d/4} (d/4), then OPQ{m}_{4m},...,PQ{m} (a rotation and reduction to 4m dims) for m = 256, 192, 128, 96,
       64, 48, 32, 16, 8 below d/4;
  3. not even the last one fits: an error asking for more --max-index-memory.
On 500k x 256 clustered vectors with M = 100M this is IVF2048,SQ6 (97 MiB, recall@10 0.97; README "Index" has the
comparison with autofaiss). With `--on-disk` rule 1 is skipped (the inverted lists of an IVF index are what can
live on disk). The chosen spec and the reason are written to index.json.

With a GPU build of faiss that sees GPUs (or `--gpu`), the k-means of training runs on them and the add's coarse
assignment on one of them, as far as each GPU's free memory allows; the index itself is built on the CPU, never
copied to a GPU (featshard.index.gpuplan). index.json `steps` says where train, add and tune ran (cpu, gpu:N), why,
and how long each took.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from featshard.index import reader as fx
from featshard.index.config import MergeConfig
from featshard.index.reader import IndexInfo
from featshard.errors import FeatshardError, UsageError
from featshard.store.atomic import fsync_file, write_atomic, write_json_atomic
from featshard.store.rundir import RunDir
from featshard.index.autospec import auto_spec, layout_of
from featshard.index.faissutil import faiss_stdout_to_stderr, is_exact
from featshard.index.gpufaiss import Placement
from featshard.index.spec import choose_train_size, make_index
from featshard.index.recall import tune
from featshard.index.vectors import (
    ShardRef, Source, batch_rows_for, check_source, gather, iter_vectors, sample_positions, source_of,
)

log = logging.getLogger("featshard.index.merge")


def train_index(index: Any, sources: Sequence[Source], size: int, seed: int, place: Placement) -> Any:
    """Train on `size` vectors drawn uniformly (seeded) across every stored row of every shard, in place; the
    k-means assignments where the plan puts them (featshard.index.gpuplan)."""
    total = sum(sum(s.counts) for s in sources)
    positions = sample_positions(total, size, seed)
    _, sample = gather(sources, positions, batch_rows_for(index.d))
    log.info("training on %d of %d vectors (%.1f MB); %s", len(sample), total, sample.nbytes / 1e6,
             place.plan.train.device)
    with place.training(index):
        index.train(sample)
    return index


def reserve_flat(index: Any, extra: int) -> None:
    """Grow a Flat index's storage once to its final size, not by doubling (which peaks at ~3x the vectors).

    std::vector keeps its capacity when resized down, so resize up then back reserves the memory.
    """
    import faiss

    top = faiss.downcast_index(index)
    if not is_exact(top) or not isinstance(top, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return
    flat = faiss.downcast_index(top.index)
    size, ids = flat.codes.size(), top.id_map.size()
    flat.codes.resize(size + extra * flat.code_size)
    flat.codes.resize(size)
    top.id_map.resize(ids + extra)
    top.id_map.resize(ids)


def fill_index(index: Any, sources: Sequence[Source], place: Placement) -> Any:
    """Add every stored vector with its id into the CPU index, streaming one batch at a time (the coarse
    assignment on a GPU where the plan says)."""
    reserve_flat(index, sum(sum(s.counts) for s in sources))
    with place.adding(index) as add:
        for ids, vecs in iter_vectors(sources, batch_rows_for(index.d)):
            add(ids, vecs)
    return index


def write_parts(trained: Any, sources: Sequence[Source], parts_dir: Path, place: Placement) -> list[str]:
    """One IVF part file per shard: a copy of the trained empty index filled with that shard's vectors."""
    import faiss

    parts_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for si, src in enumerate(sources):
        for ref, count in zip(src.shards, src.counts):
            if count:
                part = fill_index(faiss.clone_index(trained), [_single(src, ref, count)], place)
                files.append(str(parts_dir / f"part-{si:03d}-{src.id_offset}-{ref.name}.faiss"))
                write_index_atomic(part, Path(files[-1]))
                del part
    return files


def new_ivfdata_name() -> str:
    """A fresh file name per build: index.faiss switches to it atomically, readers of the old one keep theirs."""
    return f"index-{time.strftime('%Y%m%d%H%M%S')}-{np.random.default_rng().integers(1 << 30):08x}.ivfdata"


def build_on_disk(trained: Any, sources: Sequence[Source], out: Path, place: Placement) -> tuple[Any, str]:
    """Parts per shard, then faiss.contrib.ondisk.merge_ondisk of their inverted lists into one .ivfdata."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    files = write_parts(trained, sources, out / "parts", place)
    ivfdata = new_ivfdata_name()
    merged = faiss.clone_index(trained)
    with faiss_stdout_to_stderr():
        merge_ondisk(merged, files, str(out / ivfdata))
    fsync_file(out / ivfdata)
    return merged, ivfdata


def _single(src: Source, ref: ShardRef, count: int) -> Source:
    return Source(src.run_dir, src.fingerprint, src.id_offset, src.rows, src.dim, [ref], [count])


def write_index_atomic(index: Any, path: Path) -> None:
    import faiss

    write_atomic(path, lambda tmp: faiss.write_index(index, tmp))


def save(run_dir: Path, index: Any, meta: dict[str, Any], ivfdata: str | None) -> dict[str, Any]:
    """Write index.faiss then index.json atomically; drop build parts and .ivfdata files no longer referenced."""
    from featshard.store.shards import remove_tree

    paths = RunDir(run_dir)
    out = paths.index
    write_index_atomic(index, paths.index_file)
    meta["ivfdata"] = ivfdata
    meta["index_bytes"] = paths.index_file.stat().st_size + ((out / ivfdata).stat().st_size if ivfdata else 0)
    meta["peak_rss_bytes"] = fx.peak_rss_bytes()
    write_json_atomic(paths.index_meta, meta)
    remove_tree(paths.index_parts)
    if not ivfdata:
        paths.trained_index.unlink(missing_ok=True)
    for old in out.glob("*.ivfdata"):
        if old.name != ivfdata:
            old.unlink()
    return meta


def resolve_spec(spec: str, ntotal: int, dim: int, max_memory: int | None, on_disk: bool) -> tuple[str, str]:
    """`auto` -> (chosen spec, reason); any other spec is used as given."""
    if spec != "auto":
        return spec, ""
    spec, reason = auto_spec(ntotal, dim, max_memory or fx.default_max_memory(), on_disk)
    log.info("auto index spec %s: %s", spec, reason)
    return spec, reason


def populate(index: Any, sources: Sequence[Source], out: Path, on_disk: bool,
             place: Placement) -> tuple[Any, str | None]:
    """Fill a trained index by streaming; --on-disk keeps the trained empty index and builds an .ivfdata."""
    if not on_disk:
        return fill_index(index, sources, place), None
    write_index_atomic(index, RunDir(out.parent).trained_index)
    return build_on_disk(index, sources, out, place)


def build(run_dir: str | Path, spec: str = "Flat", metric: str = "ip", train_size: int | None = None,
          max_memory: int | None = None, on_disk: bool = False, target_recall: float = 0.95,
          gpu: bool | None = None, seed: int = 0) -> dict[str, Any]:
    """The merge command as a function: build, tune and write DIR/index; returns the index.json dict."""
    import faiss

    run = Path(run_dir)
    src = check_source(source_of(run))
    ntotal = sum(src.counts)
    if ntotal == 0:
        raise FeatshardError(f"{run}: the shards hold no vectors (did every image fail?); nothing to index")
    spec, reason = resolve_spec(spec, ntotal, src.dim, max_memory, on_disk)
    started = time.perf_counter()
    index = make_index(spec, src.dim, metric)
    if on_disk and faiss.try_extract_index_ivf(index) is None:
        raise UsageError(f"--on-disk needs an IVF spec (e.g. IVF1024,Flat or IVF1024,PQ32), not {spec!r}")
    place = Placement.for_index(index, gpu)
    size = 0 if index.is_trained else choose_train_size(index, spec, train_size, ntotal)
    if size:
        index = train_index(index, [src], size, seed, place)
    out = RunDir(run).index
    out.mkdir(parents=True, exist_ok=True)
    _warn_dropped_sources(out)
    index, ivfdata = populate(index, [src], out, on_disk, place)
    meta = {"spec": spec, "spec_reason": reason, "metric": metric, "ntotal": int(index.ntotal), "dim": src.dim,
            "train_size": size, "on_disk": on_disk, "gpu": place.plan.uses_gpu, "seed": seed,
            "build_seconds": round(time.perf_counter() - started, 3), "sources": [src.to_meta(run)],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with place.timed("tune"):
        meta.update(tune(index, [src], metric, target_recall, seed, knn=place.knn()))
    meta["steps"] = place.meta()
    layout = layout_of(spec, src.dim)
    if layout is not None:
        meta["estimated_bytes"] = layout.bytes(ntotal)
    return save(run, index, meta, ivfdata)


def _warn_dropped_sources(out: Path) -> None:
    try:
        previous = json.loads(RunDir(out.parent).index_meta.read_text(encoding="utf-8")).get("sources") or []
    except (OSError, ValueError):
        return
    if len(previous) > 1:
        log.warning("rebuilding from this run only: the %d run(s) added with `featshard add` must be added again",
                    len(previous) - 1)


def merge_run(config: MergeConfig) -> IndexInfo:
    """`featshard merge` as a function: build, tune and write DIR/index."""
    meta = build(config.run_dir, config.index_spec, config.metric, config.train_size, config.max_memory_bytes,
                 config.on_disk, config.target_recall, config.gpu, config.seed)
    info = IndexInfo.from_meta(config.run_dir, meta)
    log.info("index %s: %d vectors, spec %s, recall@10 %.3f, %.1f s, %s", RunDir(config.run_dir).index, info.ntotal,
             info.spec, info.recall, meta["build_seconds"], info.search_params)
    return info

"""`featshard add DIR --from OTHER_RUN`: put another run's vectors into DIR's existing index, without a rebuild.

OTHER must describe the same vectors: its fingerprint must equal DIR's, or differ only in the input list
(`fingerprint_fields` equal once the `input*` fields are left out: same model, weights, layer, pooling,
preprocessing, dtype, featshard version). Its rows get ids `offset + row`, offset = the end of the id ranges already
in the index (max over sources of id_offset + rows, i.e. at least the previous max id + 1), recorded in index.json
`sources`, so `load_index().lookup` names results of both runs. IVF indexes take the new vectors into their trained
lists (an `--on-disk` one gets a new .ivfdata holding the old and new lists); recall is measured again.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from featshard.index import reader as fx
from featshard.index import merge
from featshard.index.config import AddConfig
from featshard.index.reader import IndexInfo
from featshard.errors import FeatshardError, UsageError
from featshard.store.atomic import fsync_file
from featshard.store.rundir import RunDir
from featshard.store.manifest import diff_fields, load_manifest
from featshard.index.faissutil import apply_params, faiss_stdout_to_stderr
from featshard.index.gpufaiss import Placement
from featshard.index.recall import tune
from featshard.index.vectors import Source, check_source, source_of

log = logging.getLogger("featshard.index.add")


def vector_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint fields that change the vectors themselves (not which images were listed)."""
    fields = manifest.get("fingerprint_fields")
    if not isinstance(fields, dict):
        return {"fingerprint": manifest.get("fingerprint")}
    return {k: v for k, v in fields.items() if "input" not in k.lower()}


def check_compatible(run: Path, other: Path) -> None:
    """Refuse OTHER unless it holds the same kind of vectors as RUN; say what differs."""
    mine, theirs = load_manifest(run), load_manifest(other)
    if mine.get("fingerprint") == theirs.get("fingerprint"):
        return
    diffs = diff_fields(vector_fields(mine), vector_fields(theirs))
    if diffs:
        raise FeatshardError(f"{other} was extracted differently from {run} (fingerprint {theirs.get('fingerprint')} "
                             f"vs {mine.get('fingerprint')}); what differs: {'; '.join(diffs)}. "
                             "Only runs with the same model/config can share an index.")


def check_new_source(loaded: fx.LoadedIndex, other: Path) -> Source:
    """OTHER as a checked source with the next free id offset; refused if it is already in the index."""
    for src in loaded.sources:
        if src.run_dir.resolve() == other.resolve():
            raise UsageError(f"{other} is already in the index of {loaded.run_dir}")
    offset = max(s.id_offset + s.rows for s in loaded.sources) if loaded.sources else 0
    src = check_source(source_of(other, offset))
    if src.dim != loaded.dim:
        raise FeatshardError(f"{other} has {src.dim}-dim vectors, the index {loaded.dim}")
    if not sum(src.counts):
        raise FeatshardError(f"{other}: its shards hold no vectors; nothing to add")
    return src


def merge_with_existing(existing: Any, trained: Any, part_files: list[str], path: Path) -> Any:
    """merge_ondisk's method with the existing index's on-disk lists as one more input: a new .ivfdata."""
    import faiss

    inputs = [faiss.extract_index_ivf(existing).invlists]
    keep = []
    for fname in part_files:
        part = faiss.read_index(fname, faiss.IO_FLAG_MMAP)
        ivf = faiss.extract_index_ivf(part)
        ivf.own_invlists = False
        keep.append(part)
        inputs.append(ivf.invlists)
    ivf = faiss.extract_index_ivf(trained)
    invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(path))
    vector = faiss.InvertedListsPtrVector()
    for lists in inputs:
        vector.push_back(lists)
    with faiss_stdout_to_stderr():
        ntotal = invlists.merge_from_multiple(vector.data(), vector.size(), False)
    trained.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(invlists, True)
    invlists.this.disown()
    fsync_file(path)
    return trained


def add_on_disk(loaded: fx.LoadedIndex, src: Source, place: Placement) -> tuple[Any, str]:
    import faiss

    paths = RunDir(loaded.run_dir)
    out, trained_path = paths.index, paths.trained_index
    if not trained_path.is_file():
        raise FeatshardError(f"{trained_path} is missing (it is kept by `merge --on-disk`); rebuild with merge")
    trained = faiss.read_index(str(trained_path))
    files = merge.write_parts(trained, [src], paths.index_parts, place)
    ivfdata = merge.new_ivfdata_name()
    index = merge_with_existing(loaded.index, trained, files, out / ivfdata)
    apply_params(index, loaded.meta.get("search_params") or {})
    return index, ivfdata


def add_run(run_dir: str | Path, other_dir: str | Path, target_recall: float | None = None,
            gpu: bool | None = None) -> dict[str, Any]:
    """The add command as a function; returns the new index.json dict."""
    run, other = Path(run_dir), Path(other_dir)
    check_compatible(run, other)
    loaded = fx.load_index(run)
    src = check_new_source(loaded, other)
    started = time.perf_counter()
    place = Placement.for_index(loaded.index, gpu)
    before = loaded.ntotal
    if loaded.meta.get("on_disk"):
        index, ivfdata = add_on_disk(loaded, src, place)
    else:
        index, ivfdata = merge.fill_index(loaded.index, [src], place), None
    sources = [check_source(s) for s in loaded.sources] + [src]
    meta = dict(loaded.meta)
    target = target_recall if target_recall is not None else float(meta.get("recall_target", 0.95))
    meta.update({"ntotal": int(index.ntotal), "sources": [s.to_meta(run) for s in sources],
                 "add_seconds": round(time.perf_counter() - started, 3)})
    with place.timed("tune"):
        meta.update(tune(index, sources, meta["metric"], target, int(meta.get("seed", 0)), knn=place.knn()))
    steps = place.meta()
    meta["steps"] = {**(meta.get("steps") or {}), "add_run": {**steps["add"], "from": str(other)},
                     "tune": steps["tune"]}
    log.info("added %d vectors of %s (ids from %d): %d -> %d", index.ntotal - before, other, src.id_offset,
             before, index.ntotal)
    return merge.save(run, index, meta, ivfdata)


def add_to_index(config: AddConfig) -> IndexInfo:
    """`featshard add` as a function: put OTHER's vectors into DIR's index; returns the new index's description."""
    meta = add_run(config.run_dir, config.other, config.target_recall, config.gpu)
    info = IndexInfo.from_meta(config.run_dir, meta)
    log.info("index %s now holds %d vectors from %d runs; recall@10 %.3f", RunDir(config.run_dir).index,
             info.ntotal, len(meta["sources"]), info.recall)
    return info

"""`featshard verify DIR [--json]`: prove that every input row is accounted for exactly once.

Checks, streaming (the input list, the shards and the features are never held whole; one byte per input row is):
- every input row is in exactly one shard, in `rows` or in `failed_rows`, and in its planned shard;
- the stored names equal the input list's names; the input list still hashes to the manifest's `input.sha256`;
- every shard file is complete, has the manifest's fingerprint and dim; `rows`/`failed_rows` ascending;
- no feature vector is NaN/inf or zero (and each is unit length when the run normalises);
- failure reasons read `<class>: <message>` with a known class;
- if `DIR/index/index.faiss` exists: its ids for this run are exactly the feature rows, each once.
Exit 0 when all holds; 1 with a report naming the failed checks, counts and the first examples.
"""
from __future__ import annotations

import hashlib
import heapq
import logging
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from featshard.extract.decode import REASONS
from featshard.errors import FeatshardError
from featshard.runner.config import VerifyConfig
from featshard.runner.verifyreport import Hits, Report
from featshard.store.inputs import Item, iter_items, open_input, update_digest
from featshard.store.manifest import load_manifest
from featshard.store.plan import shard_name
from featshard.store.rundir import RunDir
from featshard.store.shards import clean_text, iter_features

log = logging.getLogger("featshard.runner.verify")
BATCH = 65536
EXAMPLES = 5


class ItemStream:
    """The input list streamed once, handed out shard range by shard range; hashes it as `scan_input` does."""

    def __init__(self, items: Iterator[Item] | None) -> None:
        self._it: Iterator[Item] | None = items
        self._next: Item | None = None
        self.digest, self.count, self.error = hashlib.sha256(), 0, ""
        self._advance()

    def _advance(self) -> None:
        try:
            self._next = next(self._it, None) if self._it is not None else None
        except (OSError, FeatshardError) as exc:  # the list went away or broke mid-way
            self._next, self.error = None, str(exc)
        if self._next is not None:
            update_digest(self.digest, self._next)
            self.count += 1

    def until(self, stop: int) -> Iterator[Item]:
        while self._next is not None and self._next.row < stop:
            item = self._next
            self._advance()
            yield item


def _sorted_pairs(h5: h5py.File, rows_key: str, names_key: str, rep: Report, where: str) -> Iterator[tuple[int, str]]:
    n, last, unordered = int(h5[rows_key].shape[0]), -1, False
    for lo in range(0, n, BATCH):
        rows = h5[rows_key][lo: lo + BATCH].astype(np.int64)
        if not unordered and len(rows) and (rows[0] < last or np.any(np.diff(rows) < 0)):
            unordered = True
            rep.problem("order", f"{where}: `{rows_key}` is not ascending", rows[:1])
        last = int(rows[-1]) if len(rows) else last
        yield from zip(rows.tolist(), h5[names_key].asstr()[lo: lo + BATCH].tolist())


def check_rows_and_names(h5: h5py.File, entry: dict[str, Any], items: Iterator[Item], seen: np.ndarray,
                         rep: Report, where: str) -> None:
    """Mark each stored row in `seen`; compare names with the input; rows outside the shard's range are wrong."""
    start, stop = int(entry["start"]), int(entry["stop"])
    pairs = heapq.merge(_sorted_pairs(h5, "rows", "names", rep, where),
                        _sorted_pairs(h5, "failed_rows", "failed_names", rep, where))
    outside, wrong_name, out_of_range, buf = Hits(), Hits(), Hits(), []
    cur = next(items, None)
    for row, name in pairs:
        if not start <= row < stop:
            outside.add([row])
        buf.append(row)
        if len(buf) >= BATCH:
            _mark(seen, buf, out_of_range)
        while cur is not None and cur.row < row:
            cur = next(items, None)
        if cur is not None and cur.row == row and clean_text(cur.name) != name:
            wrong_name.add([row])
    _mark(seen, buf, out_of_range)
    for _ in items:  # the rest of this shard's range (needed for the input hash)
        pass
    outside.report(rep, "wrong_shard", f"{where}: {{n}} rows outside its planned range [{start}, {stop})")
    wrong_name.report(rep, "names", f"{where}: {{n}} stored names differ from the input list")
    out_of_range.report(rep, "out_of_range", f"{where}: {{n}} rows outside the input's 0..{len(seen) - 1}")


def _mark(seen: np.ndarray, buf: list[int], out_of_range: Hits) -> None:
    rows = np.asarray(buf, np.int64)
    buf.clear()
    out_of_range.add(rows[(rows < 0) | (rows >= len(seen))].tolist())
    rows = rows[(rows >= 0) & (rows < len(seen))]
    np.add.at(seen, rows, 1)
    np.minimum(seen, 2, out=seen)  # 0 missing, 1 once, 2 more than once: never wraps


def check_features(h5: h5py.File, path: Path, dim: int, normalize: bool, has_feat: np.ndarray, rep: Report,
                   where: str) -> None:
    for lo in range(0, int(h5["rows"].shape[0]), BATCH):
        rows = h5["rows"][lo: lo + BATCH].astype(np.int64)
        has_feat[rows[(rows >= 0) & (rows < len(has_feat))]] = True
    if h5["features"].ndim != 2 or h5["features"].shape[1] != dim:
        rep.problem("dim", f"{where}: features have shape {h5['features'].shape}, the manifest's dim is {dim}")
        return
    if h5["features"].shape[0] != h5["rows"].shape[0] or h5["names"].shape[0] != h5["rows"].shape[0]:
        rep.problem("shape", f"{where}: rows, names and features have different lengths")
        return
    nonfinite, zero, not_unit = Hits(), Hits(), Hits()
    for rows, feats in iter_features(path, BATCH):
        feats = np.asarray(feats, np.float32)
        finite = np.isfinite(feats).all(axis=1)
        norms = np.linalg.norm(np.where(np.isfinite(feats), feats, 0), axis=1)
        nonfinite.add(rows[~finite].tolist())
        zero.add(rows[finite & (norms < 1e-6)].tolist())
        if normalize:
            not_unit.add(rows[finite & (norms >= 1e-6) & (np.abs(norms - 1) > 1e-2)].tolist())
    nonfinite.report(rep, "nan_inf", f"{where}: {{n}} NaN or inf feature vectors")
    zero.report(rep, "zero_norm", f"{where}: {{n}} zero-norm feature vectors")
    not_unit.report(rep, "not_unit", f"{where}: {{n}} feature vectors not unit-length (the run normalises)")


def check_reasons(h5: h5py.File, rep: Report, where: str) -> None:
    n = int(h5["failed_rows"].shape[0])
    if h5["failed_names"].shape[0] != n or h5["failed_reasons"].shape[0] != n:
        rep.problem("shape", f"{where}: failed_rows, failed_names and failed_reasons have different lengths")
        return
    bad = Hits()
    for lo in range(0, n, BATCH):
        rows = h5["failed_rows"][lo: lo + BATCH]
        for row, reason in zip(rows.tolist(), h5["failed_reasons"].asstr()[lo: lo + BATCH].tolist()):
            cls = reason.split(":", 1)[0]
            rep.reasons[cls] += 1
            if cls not in REASONS or ":" not in reason:
                bad.add([row])
    bad.report(rep, "reasons", f"{where}: {{n}} failure reasons are not '<class>: <message>' with a known class")


def shard_usable(path: Path, entry: dict[str, Any], manifest: dict[str, Any], rep: Report, run: Path) -> bool:
    name = path.stem
    rows = f"rows {entry['start']}..{int(entry['stop']) - 1}"
    if not path.is_file():
        if int(entry["stop"]) > int(entry["start"]):
            unfinished = RunDir(run).parts(name).is_dir()
            extra = " (chunks of an unfinished run are there: rerun `featshard run`)" if unfinished else ""
            rep.problem("missing_shard", f"{name}: no shard file; {rows} are unaccounted for{extra}")
        return False
    try:
        with h5py.File(path, "r") as h5:
            attrs = dict(h5.attrs)
    except OSError as exc:
        rep.problem("unreadable_shard", f"{name}: cannot be read ({exc}); {rows} are unaccounted for")
        return False
    if not bool(attrs.get("complete", False)):
        rep.problem("incomplete_shard", f"{name}: complete=false")
    fp = attrs.get("fingerprint")
    fp = fp.decode() if isinstance(fp, bytes) else fp
    if fp != manifest.get("fingerprint"):
        rep.problem("fingerprint", f"{name}: fingerprint {fp!r}, the manifest's is {manifest.get('fingerprint')!r}")
    if "dim" in attrs and int(attrs["dim"]) != int(manifest["model"]["dim"]):
        rep.problem("dim", f"{name}: attribute dim {int(attrs['dim'])}, the manifest's is {manifest['model']['dim']}")
    return True


def check_shards(run: Path, manifest: dict[str, Any], stream: ItemStream, seen: np.ndarray, has_feat: np.ndarray,
                 rep: Report) -> None:
    dim, normalize = int(manifest["model"]["dim"]), bool(manifest["model"].get("normalize", True))
    plan = sorted(manifest["plan"], key=lambda e: int(e["start"]))
    for entry in plan:
        path = RunDir(run).shard(shard_name(int(entry["index"]), int(entry["count"])))
        items = stream.until(int(entry["stop"]))
        if shard_usable(path, entry, manifest, rep, run):
            with h5py.File(path, "r") as h5:
                where = path.name
                check_rows_and_names(h5, entry, items, seen, rep, where)
                check_features(h5, path, dim, normalize, has_feat, rep, where)
                check_reasons(h5, rep, where)
        for _ in items:
            pass
    planned = {shard_name(int(e["index"]), int(e["count"])) + ".h5" for e in plan}
    for extra in sorted(p.name for p in RunDir(run).shards.glob("shard-*.h5") if p.name not in planned):
        rep.warnings.append(f"{extra} is not in the manifest's plan (left from another plan?); ignored")


def check_input(manifest: dict[str, Any], stream: ItemStream, rep: Report) -> None:
    for _ in stream.until(2**62):
        pass
    want = manifest.get("input", {})
    if stream.error:
        rep.problem("input", f"the input list {want.get('path')!r} cannot be read: {stream.error}")
    elif stream.count != rep.rows:
        rep.problem("input", f"the input list now has {stream.count} rows, the run has {rep.rows}: it changed")
    elif want.get("sha256") and stream.digest.hexdigest() != want["sha256"]:
        rep.problem("input", "the input list changed since the run (its names or paths hash differently)")


def check_index(run: Path, has_feat: np.ndarray, rep: Report) -> None:
    if not RunDir(run).index_file.is_file():
        return
    from featshard.index.reader import load_index, stored_ids

    try:
        loaded = load_index(run)
    except (FeatshardError, RuntimeError, OSError) as exc:
        rep.problem("index", f"index: cannot be loaded: {exc}")
        return
    ids = stored_ids(loaded.index)
    offset = loaded.sources[0].id_offset if loaded.sources else 0
    mine = ids[(ids >= offset) & (ids < offset + len(has_feat))] - offset
    rep.counts["index_ntotal"] = int(loaded.ntotal)
    uniq, counts = np.unique(mine, return_counts=True)
    if len(uniq) != len(mine):
        rep.problem("index_duplicates", f"index: {int((counts > 1).sum())} ids appear more than once",
                    uniq[counts > 1])
    stray = uniq[~has_feat[uniq]]
    if len(stray):
        rep.problem("index_extra", f"index: {len(stray)} ids are not feature rows of this run", stray)
    absent = np.setdiff1d(np.flatnonzero(has_feat), uniq)
    if len(absent):
        rep.problem("index_missing", f"index: {len(absent)} feature rows are not in the index", absent)
    ranges = [(s.id_offset, s.id_offset + s.rows) for s in loaded.sources] or [(offset, offset + len(has_feat))]
    unowned = ids[~np.any([(ids >= a) & (ids < b) for a, b in ranges], axis=0)] if len(ids) else ids
    if len(unowned):
        rep.problem("index_extra", f"index: {len(unowned)} ids belong to no source run", unowned)
    others = sum(int(e.get("stored", 0)) for e in loaded.meta.get("sources", [])[1:])
    if loaded.ntotal != int(has_feat.sum()) + others:
        rep.problem("index_size", f"index: ntotal {loaded.ntotal} != {int(has_feat.sum())} feature rows"
                    + (f" + {others} of added runs" if others else ""))


def verify(run_dir: str | Path) -> Report:
    run = Path(run_dir)
    manifest = load_manifest(run)
    rep = Report(str(run.resolve()), rows=int(manifest["rows"]))
    try:
        items: Iterator[Item] | None = iter_items(open_input(manifest["input"]["path"]))
    except FeatshardError as exc:
        items = None
        rep.problem("input", f"the input list cannot be opened: {exc}; names and hash are not checked")
    stream = ItemStream(items)
    seen, has_feat = np.zeros(rep.rows, np.uint8), np.zeros(rep.rows, bool)
    check_shards(run, manifest, stream, seen, has_feat, rep)
    if items is not None:
        check_input(manifest, stream, rep)
    missing, dups = np.flatnonzero(seen == 0), np.flatnonzero(seen > 1)
    if len(missing):
        rep.problem("missing_rows", f"{len(missing)} input rows are in no shard", missing)
    if len(dups):
        rep.problem("duplicate_rows", f"{len(dups)} input rows are stored more than once", dups)
    rep.counts.update(feature_rows=int(has_feat.sum()), failed_rows=int(sum(rep.reasons.values())),
                      missing_rows=len(missing), duplicate_rows=len(dups), shards=len(manifest["plan"]))
    check_index(run, has_feat, rep)
    return rep


def verify_run(config: VerifyConfig) -> Report:
    """`featshard verify` as a function: the report (`report.ok` tells whether every check held)."""
    return verify(config.run_dir)

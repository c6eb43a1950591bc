"""`featshard dedup DIR`: groups of near-duplicate images, and with `--exact` of byte-identical files.

Near duplicates: every stored vector (streamed from the shards of the index's source runs, in batches) is searched
in DIR's index for its `--k` nearest neighbours, with the index's tuned search parameters; never an N x N matrix.
A pair joins when its similarity is >= `--threshold` (metric ip; default 0.9, a cosine for the L2-normalised
vectors `run` stores by default: with MobileNetV2 ImageNet features, half-size and JPEG-q50 copies of photos scored
0.93-0.99 against their originals and distinct photos below 0.6) or, for an l2 index, when its squared distance is
<= `--threshold` (default 0.2, the same cosine 0.9 for unit vectors since |a-b|^2 = 2 - 2 cos). Groups are the
connected components of the pairs (union-find). Random-init weights (`--weights none`) give every image cosine
> 0.9: dedup needs trained weights.
Scores are the index's own: approximate for PQ indexes.

Exact duplicates (`--exact`): the source runs' input lists are streamed; files (or tar members) of equal size are
hashed (sha256, 1 MiB blocks) and equal hashes form a group.

Output: a table on stdout (default), `--json` ({"near": [...], "exact": [...]}) or `--csv`, or into `--out FILE`.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from featshard.index import reader as fx
from featshard.index.config import DedupConfig
from featshard.store.atomic import write_atomic
from featshard.system import sha256_file
from featshard.store.inputs import item_size, iter_items, open_input, read_item_bytes
from featshard.store.webdataset import TarMember
from featshard.store.manifest import load_manifest
from featshard.index.vectors import Source, batch_rows_for, iter_vectors

log = logging.getLogger("featshard.index.dedup")

DEFAULT_THRESHOLD = {"ip": 0.9, "l2": 0.2}
QUERY_BATCH = 4096


class UnionFind:
    """Disjoint sets over the ids that appear in a pair (memory grows with the duplicates, not with N)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = defaultdict(list)
        for x in list(self.parent):
            out[self.find(x)].append(x)
        return sorted((sorted(g) for g in out.values() if len(g) > 1), key=lambda g: g[0])


def near_pairs(loaded: fx.LoadedIndex, threshold: float, k: int) -> dict[tuple[int, int], float]:
    """{(a, b): score} for every stored vector's kNN with a score past the threshold (a < b)."""
    higher = loaded.meta.get("metric", "ip") == "ip"
    pairs: dict[tuple[int, int], float] = {}
    batches = iter_vectors(loaded.sources, min(QUERY_BATCH, batch_rows_for(loaded.dim)))
    for ids, vecs in batches:
        scores, found = loaded.search(vecs, min(k + 1, max(1, loaded.ntotal)))
        ok = (found >= 0) & (found != ids[:, None]) & ((scores >= threshold) if higher else (scores <= threshold))
        for qi, col in zip(*np.nonzero(ok)):
            a, b = int(ids[qi]), int(found[qi, col])
            key = (a, b) if a < b else (b, a)
            score = float(scores[qi, col])
            if key not in pairs or (score > pairs[key] if higher else score < pairs[key]):
                pairs[key] = score
    return pairs


def near_groups(loaded: fx.LoadedIndex, threshold: float, k: int) -> list[dict[str, Any]]:
    """Connected components of the near pairs, with names, pair scores and each member's best score."""
    pairs = near_pairs(loaded, threshold, k)
    higher = loaded.meta.get("metric", "ip") == "ip"
    sets, best = UnionFind(), dict[int, float]()
    by_root: dict[int, list[list[Any]]] = defaultdict(list)
    for (a, b), score in pairs.items():
        sets.union(a, b)
        for x in (a, b):
            best[x] = score if x not in best else (max(best[x], score) if higher else min(best[x], score))
    for (a, b), score in pairs.items():
        by_root[sets.find(a)].append([a, b, round(score, 6)])
    groups = sets.groups()
    flat = [i for g in groups for i in g]
    names = dict(zip(flat, loaded.lookup(np.asarray(flat, np.int64)))) if flat else {}
    out = []
    for n, members in enumerate(groups):
        group_pairs = by_root[sets.find(members[0])]
        scores = [p[2] for p in group_pairs]
        out.append({"group": n, "kind": "near", "size": len(members), "score_min": min(scores),
                    "score_max": max(scores), "pairs": group_pairs,
                    "members": [_member(i, names[i], round(best[i], 6)) for i in members]})
    return out


def _member(ident: int, where: tuple[str | None, str | None, int], score: float | None) -> dict[str, Any]:
    name, run_dir, row = where
    return {"id": int(ident), "name": name, "run_dir": run_dir, "row": int(row), "score": score}


def sha256_input(path: str | TarMember) -> str:
    """sha256 of an input image: a file in 1 MiB blocks, or a tar member's bytes."""
    if isinstance(path, TarMember):
        return hashlib.sha256(read_item_bytes(path)).hexdigest()
    return sha256_file(path)


def exact_groups(sources: Iterable[Source]) -> list[dict[str, Any]]:
    """Groups of byte-identical input files over all source runs: size first, then sha256 of equal sizes."""
    by_size: dict[int, list[tuple[int, str, str, str | TarMember, int]]] = defaultdict(list)
    unreadable = 0
    for src in sources:
        manifest = load_manifest(src.run_dir)
        for item in iter_items(open_input(manifest["input"]["path"])):
            try:
                size = item_size(item.path)
            except OSError:
                unreadable += 1
                continue
            by_size[size].append((src.id_offset + item.row, item.name, str(src.run_dir), item.path, item.row))
    by_hash: dict[str, list[tuple[int, str, str, str | TarMember, int]]] = defaultdict(list)
    for entries in (e for e in by_size.values() if len(e) > 1):
        for entry in entries:
            try:
                by_hash[sha256_input(entry[3])].append(entry)
            except OSError:
                unreadable += 1
    if unreadable:
        log.warning("--exact: %d input files could not be read and were skipped", unreadable)
    groups = sorted((sorted(g) for g in by_hash.values() if len(g) > 1), key=lambda g: g[0][0])
    return [{"group": n, "kind": "exact", "size": len(g), "sha256": sha256_input(g[0][3]),
             "members": [_member(e[0], (e[1], e[2], e[4]), None) for e in g]} for n, g in enumerate(groups)]


@dataclass
class DedupResult:
    """Near-duplicate groups (and byte-identical ones when `exact_checked`); each group a dict with `group`, `kind`,
    `size`, `members` ({id, name, run_dir, row, score}) and for near groups `score_min`, `score_max`, `pairs`."""

    run_dir: str
    metric: str
    threshold: float
    k: int
    near: list[dict[str, Any]]
    exact: list[dict[str, Any]]
    exact_checked: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def render(res: DedupResult, fmt: str) -> str:
    result = res.to_dict()
    if fmt == "json":
        return json.dumps(result, indent=2, ensure_ascii=False) + "\n"
    buf = io.StringIO()
    if fmt == "csv":
        writer = csv.writer(buf)
        writer.writerow(["kind", "group", "id", "name", "run_dir", "row", "score"])
        for group in result["near"] + result["exact"]:
            for m in group["members"]:
                writer.writerow([group["kind"], group["group"], m["id"], m["name"], m["run_dir"], m["row"],
                                 "" if m["score"] is None else m["score"]])
        return buf.getvalue()
    for group in result["near"] + result["exact"]:
        extra = f"score {group['score_min']:.4f}..{group['score_max']:.4f}" if group["kind"] == "near" else \
            f"sha256 {group['sha256'][:16]}"
        buf.write(f"{group['kind']} group {group['group']}: {group['size']} images, {extra}\n")
        for m in group["members"]:
            buf.write(f"  {m['id']:>10}  {m['name']}\n")
    buf.write(f"{len(result['near'])} near-duplicate groups (threshold {result['threshold']}, k {result['k']})"
              + (f", {len(result['exact'])} exact-duplicate groups\n" if result["exact_checked"] else "\n"))
    return buf.getvalue()


def dedup(run_dir: str | Path, threshold: float | None = None, k: int = 10, exact: bool = False) -> DedupResult:
    """Near (and with exact=True, byte-identical) duplicate groups of the images in DIR's index."""
    loaded = fx.load_index(run_dir)
    metric = loaded.meta.get("metric", "ip")
    threshold = DEFAULT_THRESHOLD[metric] if threshold is None else float(threshold)
    near = near_groups(loaded, threshold, k)
    log.info("%d near-duplicate groups among %d vectors", len(near), loaded.ntotal)
    return DedupResult(str(run_dir), metric, threshold, k, near, exact_groups(loaded.sources) if exact else [], exact)


def dedup_run(config: DedupConfig) -> DedupResult:
    """`featshard dedup` as a function; with `out` set, also writes the rendering (text, or --json/--csv) there."""
    result = dedup(config.run_dir, config.threshold, config.k, config.exact)
    if config.out:
        write_atomic(config.out, render(result, output_format(config)))
    return result


def output_format(config: DedupConfig) -> str:
    return "json" if config.json else "csv" if config.csv else "text"

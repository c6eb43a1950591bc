"""`featshard search DIR --image PATH ... | --input LIST`: nearest stored images of each query.

Queries are extracted with exactly the run's recorded config, in batches, and looked up in `DIR/index/`.
Prints a table, or JSON (`--json`: [{"query", "results": [{"name", "row", "score"}]}]) or CSV (`--csv`).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any, Iterator

import numpy as np

from featshard.errors import UsageError
from featshard.store.inputs import Item, iter_items, open_input
from featshard.store.manifest import load_manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="DIR", help="a run directory with a merged index")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="query image (repeatable)")
    p.add_argument("--input", default=None, help="list/CSV/parquet/directory/tars of query images")
    p.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--batch-size", type=int, default=32, help="queries per model batch")
    p.add_argument("--loader-workers", type=int, default=1, help="decode processes")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--csv", action="store_true", help="print CSV: query,rank,name,row,score")


def query_items(args: argparse.Namespace) -> list[Item]:
    if bool(args.image) == bool(args.input):
        raise UsageError("give query images with --image PATH (repeatable) or --input LIST, not both or neither")
    if args.input:
        return [Item(i, it.name, it.path) for i, it in enumerate(iter_items(open_input(args.input)))]
    return [Item(i, path, path) for i, path in enumerate(args.image)]


def run_queries(run_dir: str, items: list[Item], k: int, batch_size: int, workers: int) -> list[dict[str, Any]]:
    from featshard.index.reader import load_index
    from featshard.extract.query import QueryExtractor

    manifest = load_manifest(run_dir)
    index = load_index(run_dir)
    extractor = QueryExtractor(manifest, batch_size, workers)
    out: list[dict[str, Any]] = []
    for group in _batched(extractor.features(items), batch_size):
        ok = [(item, vec) for item, vec, _ in group if vec is not None]
        hits = _search(index, np.stack([v for _, v in ok]), k) if ok else []
        found = dict(zip((item.row for item, _ in ok), hits))
        for item, vec, reason in group:
            out.append({"query": item.name, "results": found[item.row]} if vec is not None
                       else {"query": item.name, "error": reason, "results": []})
    return out


def _batched(it: Iterator[Any], n: int) -> Iterator[list[Any]]:
    group: list[Any] = []
    for x in it:
        group.append(x)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


def _search(index: Any, queries: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    flat = [int(i) for i in ids.ravel() if i >= 0]
    names = dict(zip(flat, index.lookup(np.array(flat, np.int64)))) if flat else {}
    return [[_hit(names[int(i)], int(i), float(s)) for s, i in zip(srow, irow) if i >= 0]
            for srow, irow in zip(scores, ids)]


def _hit(found: tuple[str, str, int], index_id: int, score: float) -> dict[str, Any]:
    """`row` is the input row in the run that holds the image (`run_dir`); `id` is the faiss id (they differ only
    for runs added with `featshard add`, whose ids are offset)."""
    name, run_dir, row = found
    return {"name": name, "row": int(row), "score": round(score, 6), "id": index_id, "run_dir": run_dir}


def command(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise UsageError("-k must be >= 1")
    results = run_queries(args.run_dir, query_items(args), args.k, args.batch_size, args.loader_workers)
    if args.json:
        json.dump(results, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["query", "rank", "name", "row", "score"])
        for res in results:
            for rank, hit in enumerate(res["results"], 1):
                writer.writerow([res["query"], rank, hit["name"], hit["row"], hit["score"]])
    else:
        print_table(results)
    return 1 if any("error" in r for r in results) else 0


def print_table(results: list[dict[str, Any]]) -> None:
    for res in results:
        print(f"query: {res['query']}")
        if "error" in res:
            print(f"  could not read the query: {res['error']}")
        for rank, hit in enumerate(res["results"], 1):
            print(f"  {rank:>3}  {hit['score']:8.4f}  row {hit['row']:<8} {hit['name']}")

"""`featshard search DIR --image PATH ... | --input LIST`: nearest stored images of each query.

Queries are extracted with exactly the run's recorded config (the same extraction step as the stored vectors:
featshard.extract.query), in batches, and looked up in `DIR/index/`. The CLI prints a table, JSON (`--json`:
[{"query", "results": [{"name", "row", "score", "id", "run"}]}], plus "error" for a query that could not be read) or
CSV (`--csv`).
"""
from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from typing import Iterator, TypeVar

import numpy as np

from featshard.index.config import SearchConfig
from featshard.index.reader import LoadedIndex, load_index
from featshard.store.inputs import Item, iter_items, open_input
from featshard.store.manifest import load_manifest

T = TypeVar("T")


@dataclass
class Hit:
    """One stored image found: `row` is its input row in `run` (the run that holds it: the searched run, or one added
    with `featshard add`); `id` is its faiss id (equal to `row` except for added runs, whose ids are offset)."""

    name: str
    row: int
    score: float
    id: int
    run: str


@dataclass
class QueryResult:
    query: str
    results: list[Hit] = field(default_factory=list)
    error: str | None = None  # why the query image could not be read (then `results` is empty)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"query": self.query, "results": [asdict(h) for h in self.results]}
        if self.error is not None:
            out["error"] = self.error
        return out


def query_items(config: SearchConfig) -> list[Item]:
    if config.input:
        return [Item(i, it.name, it.path) for i, it in enumerate(iter_items(open_input(config.input)))]
    return [Item(i, path, path) for i, path in enumerate(config.images)]


def search_run(config: SearchConfig) -> list[QueryResult]:
    """`featshard search` as a function: one QueryResult per query image, in the order given."""
    from featshard.extract.query import QueryExtractor

    index = load_index(config.run_dir)
    extractor = QueryExtractor(load_manifest(config.run_dir), config.batch_size, config.loader_workers,
                               run_dir=config.run_dir)
    out: list[QueryResult] = []
    for group in _batched(extractor.features(query_items(config)), config.batch_size):
        ok = [(item, vec) for item, vec, _ in group if vec is not None]
        hits = search_vectors(index, np.stack([v for _, v in ok]), config.k) if ok else []
        found = dict(zip((item.row for item, _ in ok), hits))
        out += [QueryResult(item.name, found[item.row]) if vec is not None else QueryResult(item.name, error=reason)
                for item, vec, reason in group]
    return out


def _batched(it: Iterator[T], n: int) -> Iterator[list[T]]:
    group: list[T] = []
    for x in it:
        group.append(x)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


def search_vectors(index: LoadedIndex, queries: np.ndarray, k: int) -> list[list[Hit]]:
    """The top-k hits of each query vector, named through the index's source runs."""
    scores, ids = index.search(queries, k)
    flat = [int(i) for i in ids.ravel() if i >= 0]
    names = dict(zip(flat, index.lookup(np.array(flat, np.int64)))) if flat else {}
    return [[_hit(names[int(i)], int(i), float(s)) for s, i in zip(srow, irow) if i >= 0]
            for srow, irow in zip(scores, ids)]


def _hit(found: tuple[str | None, str | None, int], index_id: int, score: float) -> Hit:
    name, run_dir, row = found
    return Hit(name=name or "", row=int(row), score=round(score, 6), id=index_id, run=run_dir or "")


def render_csv(results: list[QueryResult]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["query", "rank", "name", "row", "score"])
    for res in results:
        for rank, hit in enumerate(res.results, 1):
            writer.writerow([res.query, rank, hit.name, hit.row, hit.score])
    return buf.getvalue()


def render_table(results: list[QueryResult]) -> str:
    lines = []
    for res in results:
        lines.append(f"query: {res.query}")
        if res.error is not None:
            lines.append(f"  could not read the query: {res.error}")
        for rank, hit in enumerate(res.results, 1):
            lines.append(f"  {rank:>3}  {hit.score:8.4f}  row {hit.row:<8} {hit.name}")
    return "\n".join(lines) + ("\n" if lines else "")

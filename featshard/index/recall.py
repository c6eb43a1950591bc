"""Recall@k of an approximate index and the tuning `merge` runs: which search parameter trades speed for recall
(`tunable`: nprobe for IVF, efSearch for HNSW), exact ground truth streamed over the stored vectors (`exact_knn`),
and the sweep that raises the parameter until the target recall (`tune`); its result goes into index.json."""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Sequence

import numpy as np

from featshard.index.faissutil import apply_params, faiss_metric, is_exact, unwrap
from featshard.index.vectors import Source, batch_rows_for, gather, iter_vectors, sample_positions

log = logging.getLogger("featshard.index.recall")

PLATEAU = 0.002  # recall gains below this for two steps in a row end the tuning sweep


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


Knn = Callable[[np.ndarray, np.ndarray, int, int], tuple[np.ndarray, np.ndarray]]


def exact_knn(queries: np.ndarray, sources: Sequence[Source], k: int, metric: str,
              knn: Knn | None = None) -> np.ndarray:
    """Exact top-k ids of queries over every stored vector, streaming shard batches (never all vectors);
    knn(xq, xb, k, faiss metric): faiss.knn by default, faiss.knn_gpu on a GPU plan (featshard.index.gpufaiss)."""
    import faiss

    heap = faiss.ResultHeap(len(queries), k, keep_max=metric == "ip")
    for ids, vecs in iter_vectors(sources, batch_rows_for(queries.shape[1])):
        dist, pos = (knn or faiss.knn)(queries, vecs, min(k, len(vecs)), faiss_metric(metric))
        heap.add_result(dist, np.where(pos >= 0, ids[np.maximum(pos, 0)], -1))
    heap.finalize()
    return heap.I


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (truth without -1 padding)."""
    hits = [len(set(f[f >= 0]) & set(t[t >= 0])) / max(1, int((t >= 0).sum())) for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 1.0


def tune(index: Any, sources: Sequence[Source], metric: str, target: float, seed: int,
         queries: int = 1000, k: int = 10, knn: Knn | None = None) -> dict[str, Any]:
    """Measure recall@k on stored vectors used as queries; raise nprobe/efSearch until it reaches the target
    (or stops improving: a PQ index's codes cap its recall whatever nprobe is)."""
    started = time.perf_counter()
    if is_exact(index):
        return {"search_params": {}, "recall_at_10": 1.0, "recall_target": target, "recall_note": "exact index",
                "recall_queries": 0, "tune_seconds": 0.0}
    positions = sample_positions(sum(sum(s.counts) for s in sources), queries, seed + 1)
    _, q = gather(sources, positions, batch_rows_for(index.d))
    truth = exact_knn(q, sources, k, metric, knn)
    name, candidates = tunable(index)
    best: tuple[float, int | None] = (-1.0, None)
    stale = 0
    values: list[int | None] = list(candidates) or [None]
    for value in values:
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

"""Small helpers over faiss index objects, shared by the index modules: the metric, unwrapping wrapper indexes,
telling an exact (brute-force) index, setting search parameters, and keeping faiss's printf()s off stdout."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

from featshard.errors import UsageError

METRICS = ("ip", "l2")


def faiss_metric(metric: str) -> int:
    import faiss

    if metric not in METRICS:
        raise UsageError(f"--metric must be one of {', '.join(METRICS)}, not {metric!r}")
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


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


def apply_params(index: Any, params: dict[str, Any]) -> None:
    """Set search parameters (nprobe, efSearch, ...) through the wrappers with faiss.ParameterSpace."""
    import faiss

    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, float(value) if isinstance(value, float) else int(value))


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

"""How the faiss index `merge` builds is made: `--max-index-memory` sizes (`parse_size`), `make_index` (index_factory
plus an id map) and the training-sample size a spec needs (`train_bounds`, `choose_train_size`). Which spec
`--index-spec auto` picks: featshard.index.autospec."""
from __future__ import annotations

import logging
import re
from typing import Any

from featshard.errors import FeatshardError, UsageError
from featshard.index.autospec import MIN_POINTS_PER_CENTROID, nlist_for
from featshard.index.faissutil import faiss_metric, unwrap

log = logging.getLogger("featshard.index.spec")

DEFAULT_TRAIN_MIN = 10_000
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4G', '512M', '1.5GiB', '1000000' -> bytes (binary units)."""
    match = _SIZE.match(str(text))
    if not match:
        raise UsageError(f"--max-index-memory {text!r}: expected bytes like 4G, 512M or 1000000")
    power = " kmgt".index(match.group(2).lower() or " ")
    return int(float(match.group(1)) * 1024 ** power)


def make_index(spec: str, dim: int, metric: str) -> Any:
    """faiss.index_factory(spec), wrapped in IndexIDMap2 unless it takes ids itself (IVF, or an IDMap spec; an IVF
    under a refine step does not)."""
    import faiss

    if not spec or not spec.strip():
        raise UsageError("--index-spec is empty")
    try:
        index = faiss.index_factory(dim, spec.strip(), faiss_metric(metric))
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1][:200]
        raise UsageError(f"--index-spec {spec!r} is not a faiss index_factory string usable for dim {dim}: "
                         f"{detail}") from exc
    top = faiss.downcast_index(index)
    ivf = faiss.try_extract_index_ivf(top)
    inner = faiss.downcast_index(ivf) if ivf is not None else unwrap(top)
    if getattr(inner, "do_polysemous_training", False):
        inner.do_polysemous_training = False  # factory "PQm" turns it on: minutes of annealing, unused by search
    takes_ids = ivf is not None and not isinstance(top, faiss.IndexRefine)  # IndexRefine has no add_with_ids
    if not takes_ids and not isinstance(top, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.IndexIDMap2(index)  # the factory's object, which owns the C++ index (`top` is a view)
    return index


def train_bounds(index: Any) -> tuple[int, int]:
    """(hard minimum, recommended) training points: 1 and 39 per IVF list and per PQ centroid (ksub)."""
    import faiss

    need = 1
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        need = max(need, int(ivf.nlist))
    inner = unwrap(ivf if ivf is not None else index)
    pq = getattr(inner, "pq", None)
    if pq is not None:
        need = max(need, int(pq.ksub))
    return need, MIN_POINTS_PER_CENTROID * need


def choose_train_size(index: Any, spec: str, requested: int | None, available: int) -> int:
    """--train-size or the default max(39 x nlist/ksub, 10,000), capped by the stored vectors; errors when too few."""
    hard, recommended = train_bounds(index)
    if available < hard:
        raise FeatshardError(f"--index-spec {spec!r} needs at least {hard} training vectors (one per list / "
                             f"centroid) but the run stores only {available}; use a smaller nlist "
                             f"(e.g. IVF{nlist_for(available)},Flat) or Flat")
    if requested is not None and requested < hard:
        raise UsageError(f"--train-size {requested} is below the {hard} vectors {spec!r} needs")
    size = requested if requested is not None else max(recommended, DEFAULT_TRAIN_MIN)
    if size > available:
        if requested is not None:
            log.warning("--train-size %d > %d stored vectors: training on all of them", size, available)
        size = available
    if size < recommended:
        log.warning("training %s on %d vectors; faiss recommends >= %d", spec, size, recommended)
    return int(size)

"""Which faiss index `merge` builds, and how it is made: the `--index-spec auto` rule (`auto_spec`, documented in
`featshard merge --help`, i.e. the featshard.index.merge docstring), nlist and memory sizes, `make_index` (index_factory
plus an id map) and the training-sample size a spec needs (`train_bounds`, `choose_train_size`)."""
from __future__ import annotations

import logging
import math
import re
from typing import Any

from featshard.errors import FeatshardError, UsageError
from featshard.index.faissutil import faiss_metric, unwrap

log = logging.getLogger("featshard.index.spec")

FLAT_AUTO_MAX = 100_000
HNSW_QUANTIZER_MIN_NLIST = 16_384
PQ_CHOICES = (64, 48, 32, 16, 8)
MIN_POINTS_PER_CENTROID = 39
DEFAULT_TRAIN_MIN = 10_000
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4G', '512M', '1.5GiB', '1000000' -> bytes (binary units)."""
    match = _SIZE.match(str(text))
    if not match:
        raise UsageError(f"--max-index-memory {text!r}: expected bytes like 4G, 512M or 1000000")
    power = " kmgt".index(match.group(2).lower() or " ")
    return int(float(match.group(1)) * 1024 ** power)


def nlist_for(n: int) -> int:
    """Power of two nearest 4·sqrt(n), at most n/39 (and 262144), at least 1."""
    if n < MIN_POINTS_PER_CENTROID * 2:
        return 1
    k = 2 ** round(math.log2(4 * math.sqrt(n)))
    cap = 2 ** int(math.log2(n // MIN_POINTS_PER_CENTROID))
    return int(max(1, min(k, cap, 262_144)))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def auto_spec(n: int, dim: int, max_memory: int, on_disk: bool = False) -> tuple[str, str]:
    """The documented auto rule (featshard.index.merge docstring): (spec, reason)."""
    budget, flat = human_bytes(max_memory), n * (4 * dim + 48)
    if not on_disk and n < FLAT_AUTO_MAX and flat <= max_memory:
        return "Flat", f"{n} vectors < {FLAT_AUTO_MAX} and Flat needs {human_bytes(flat)} <= {budget}: exact search"
    k = nlist_for(n)
    quantizer = f"IVF{k}_HNSW32" if k >= HNSW_QUANTIZER_MIN_NLIST else f"IVF{k}"
    centroids = k * dim * 4
    ivf_flat = n * (4 * dim + 8) + centroids
    why = "--on-disk needs IVF" if on_disk else f"{n} vectors >= {FLAT_AUTO_MAX} or Flat does not fit in {budget}"
    if ivf_flat <= max_memory:
        return f"{quantizer},Flat", f"{why}; IVF-Flat needs {human_bytes(ivf_flat)}; nlist {k} ~ 4*sqrt(N)"
    for m in PQ_CHOICES:
        need = n * (m + 8) + centroids
        if m > dim or need > max_memory:
            continue
        reason = (f"IVF-Flat needs {human_bytes(ivf_flat)}, does not fit in {budget}; PQ{m} needs "
                  f"{human_bytes(need)}; nlist {k} ~ 4*sqrt(N)")
        if dim <= 4 * m and dim % m == 0:
            return f"{quantizer},PQ{m}", reason
        d_out = min(4 * m, dim - dim % m)
        return f"OPQ{m}_{d_out},{quantizer},PQ{m}", reason + f"; OPQ rotation to {d_out} dims for {m} sub-quantizers"
    raise UsageError(f"{n} vectors of dim {dim} do not fit in --max-index-memory {budget} even as PQ8 "
                     f"({human_bytes(n * 16)}): raise --max-index-memory")


def make_index(spec: str, dim: int, metric: str) -> Any:
    """faiss.index_factory(spec), wrapped in IndexIDMap2 unless it takes ids itself (IVF, or an IDMap spec)."""
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
    if ivf is None and not isinstance(top, (faiss.IndexIDMap, faiss.IndexIDMap2)):
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

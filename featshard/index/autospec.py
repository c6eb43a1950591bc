"""`--index-spec auto`: the index that fits the memory it is given (the rule is documented in featshard.index.merge's
docstring, i.e. `featshard merge --help`), and `Layout.bytes`, the size estimate it checks each candidate against
(an index's file size, which is also its memory once loaded; tests/test_autospec.py checks it against real files).

The vector codes, most faithful first, with their bytes per d-dim vector and recall@10 measured on 100k x 256
clustered unit vectors (featshard.tools.indexbench data; IVF1024, nprobe raised until 0.95 or a plateau): Flat 4d,
SQ8 d (0.993), SQ6 3d/4 (0.977), PQ{d/2} d/2 (0.946: 2-dim sub-vectors, 8 bits each), SQ4 d/2 (0.914), PQ{d/4}
d/4 (0.835), then OPQ-rotated PQ with fewer bytes. Fast-scan 4-bit PQ loses more than it saves (PQ128x4fs, 64 bytes:
0.747, vs PQ64's 0.835 in the same bytes); a refine step stores a second, finer code of every vector, so within one
budget it beats spending those bytes on one code only for search speed, not recall: neither is on the ladder.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from featshard.errors import UsageError

FLAT_AUTO_MAX = 100_000
HNSW_QUANTIZER_MIN_NLIST = 16_384
HNSW_M = 32
MIN_POINTS_PER_CENTROID = 39
OPQ_CHOICES = (256, 192, 128, 96, 64, 48, 32, 16, 8)
PQ_KSUB = 256
ID_BYTES = 8  # an IVF list entry's id
IDMAP2_BYTES = 48  # a Flat index's id per vector: the id table plus IndexIDMap2's reverse map in memory
LIST_BYTES = 8  # an inverted list's size field
FIXED_BYTES = 4096  # headers and small fields
_LAYOUT = re.compile(r"^(?:OPQ(\d+)_(\d+),)?IVF(\d+)(?:_HNSW(\d+))?,(Flat|SQ[468]|PQ\d+)$")


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


@dataclass(frozen=True)
class Layout:
    """The shape of an index that its size depends on: Flat (nlist 0), or IVF with a vector code ("Flat", "SQ8",
    "SQ6", "SQ4", "PQ{m}" with 8-bit sub-quantizers), an HNSW{hnsw} coarse quantizer, an OPQ{m}_{d_out} rotation."""

    dim: int
    code: str = "Flat"
    nlist: int = 0
    hnsw: int = 0
    opq: tuple[int, int] | None = None

    @property
    def ivf_dim(self) -> int:
        return self.opq[1] if self.opq else self.dim

    @property
    def code_bytes(self) -> int:
        d = self.ivf_dim
        if self.code == "Flat":
            return 4 * d
        if self.code.startswith("SQ"):
            return math.ceil(int(self.code[2:]) * d / 8)
        return int(self.code[2:])

    @property
    def spec(self) -> str:
        if not self.nlist:
            return "Flat"
        quantizer = f"IVF{self.nlist}" + (f"_HNSW{self.hnsw}" if self.hnsw else "")
        rotation = f"OPQ{self.opq[0]}_{self.opq[1]}," if self.opq else ""
        return f"{rotation}{quantizer},{self.code}"

    def bytes(self, n: int) -> int:
        """Estimated size of this index holding n vectors (>= the real file; tests/test_autospec.py)."""
        if not self.nlist:
            return n * (4 * self.dim + IDMAP2_BYTES) + FIXED_BYTES
        d = self.ivf_dim
        quantizer = self.nlist * (4 * d + (8 * self.hnsw + 64 if self.hnsw else 0))
        trained = {"F": 0, "S": 8 * d, "P": 4 * PQ_KSUB * d}[self.code[0]]
        rotation = 4 * (self.dim + 1) * d if self.opq else 0
        lists = n * (self.code_bytes + ID_BYTES) + self.nlist * LIST_BYTES
        return lists + quantizer + trained + rotation + FIXED_BYTES


def layout_of(spec: str, dim: int) -> Layout | None:
    """The Layout of a spec of the shapes the auto rule writes; None for any other spec."""
    if spec.strip() == "Flat":
        return Layout(dim)
    match = _LAYOUT.match(spec.strip())
    if not match:
        return None
    opq_m, d_out, nlist, hnsw, code = match.groups()
    return Layout(dim, code, int(nlist), int(hnsw or 0), (int(opq_m), int(d_out)) if opq_m else None)


def code_ladder(dim: int) -> list[Layout]:
    """The IVF codes of the rule, most faithful (and largest) first, as Layouts without nlist."""
    codes = [Layout(dim, "Flat"), Layout(dim, "SQ8"), Layout(dim, "SQ6")]
    codes.append(Layout(dim, f"PQ{dim // 2}") if dim % 2 == 0 else Layout(dim, "SQ4"))
    if dim % 4 == 0:
        codes.append(Layout(dim, f"PQ{dim // 4}"))
    codes += [Layout(dim, f"PQ{m}", opq=(m, 4 * m)) for m in OPQ_CHOICES if 4 * m < dim]
    return codes


def with_lists(layout: Layout, n: int) -> Layout:
    k = nlist_for(n)
    return Layout(layout.dim, layout.code, k, HNSW_M if k >= HNSW_QUANTIZER_MIN_NLIST else 0, layout.opq)


def auto_spec(n: int, dim: int, max_memory: int, on_disk: bool = False) -> tuple[str, str]:
    """The documented auto rule (featshard.index.merge docstring): (spec, reason)."""
    budget, flat = human_bytes(max_memory), Layout(dim).bytes(n)
    if not on_disk and n < FLAT_AUTO_MAX and flat <= max_memory:
        return "Flat", f"{n} vectors < {FLAT_AUTO_MAX} and Flat needs {human_bytes(flat)} <= {budget}: exact search"
    why = "--on-disk needs IVF" if on_disk else f"{n} vectors >= {FLAT_AUTO_MAX} or Flat does not fit in {budget}"
    ladder = [with_lists(code, n) for code in code_ladder(dim)]
    too_big: list[str] = []
    for layout in ladder:
        need = layout.bytes(n)
        if need <= max_memory:
            bigger = f"; too big: {', '.join(too_big)}" if too_big else ""
            return layout.spec, (f"{why}; the most faithful code that fits: {layout.code} needs "
                                 f"{human_bytes(need)} <= {budget}{bigger}; nlist {layout.nlist} ~ 4*sqrt(N)")
        too_big.append(f"{layout.code} ({human_bytes(need)})")
    raise UsageError(f"{n} vectors of dim {dim} do not fit in --max-index-memory {budget} even as "
                     f"{ladder[-1].spec} ({human_bytes(ladder[-1].bytes(n))}): raise --max-index-memory")

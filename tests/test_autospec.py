from __future__ import annotations

import faiss
import numpy as np
import pytest
from helpers import clustered

from featshard.errors import UsageError
from featshard.index.autospec import FIXED_BYTES, Layout, auto_spec, code_ladder, layout_of, nlist_for, with_lists
from featshard.index.gpufaiss import Placement
from featshard.index.spec import make_index

faiss.omp_set_num_threads(1)  # shared 2-core box: OpenMP threads spinning under load are ~20x slower


@pytest.fixture(scope="module")
def vectors():
    return clustered(3000, 32, seed=3, clusters=40, spread=1.0)


@pytest.mark.parametrize("spec", ["Flat", "IVF16,Flat", "IVF16,SQ8", "IVF16,SQ6", "IVF16,SQ4", "IVF16,PQ16",
                                  "IVF16,PQ8", "OPQ4_16,IVF16,PQ4", "IVF64_HNSW32,PQ16"])
def test_the_estimate_bounds_the_real_index_size_tightly(vectors, spec):
    index = make_index(spec, 32, "ip")
    if spec.startswith("OPQ"):
        faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0)).niter = 3  # sizes only: be quick
    with Placement().training(index):  # the CPU plan: pads 2-dim PQ sub-vectors for faiss's fast flat search
        index.train(vectors[:1000])
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    real = faiss.serialize_index(index).nbytes
    layout = layout_of(spec, 32)
    assert layout is not None and layout.spec == spec
    estimate = layout.bytes(len(vectors))
    assert real <= estimate
    if spec != "Flat":  # Flat's estimate counts IndexIDMap2's in-memory reverse map, which the file lacks
        assert estimate <= real + FIXED_BYTES + 128 * layout.nlist


def test_layouts_parse_only_the_rule_s_shapes():
    assert layout_of("IVF2048,SQ6", 256) == Layout(256, "SQ6", 2048)
    assert layout_of("OPQ96_384,IVF131072_HNSW32,PQ96", 2048) == Layout(2048, "PQ96", 131072, 32, (96, 384))
    assert layout_of("IVF64,PQ16x4fs", 32) is None and layout_of("HNSW32", 32) is None
    assert Layout(256, "SQ6").code_bytes == 192 and Layout(100, "SQ4").code_bytes == 50
    assert Layout(2048, "PQ96", opq=(96, 384)).ivf_dim == 384


def test_the_ladder_goes_from_most_to_least_faithful():
    assert [c.code for c in code_ladder(256)] == ["Flat", "SQ8", "SQ6", "PQ128", "PQ64", "PQ48", "PQ32", "PQ16",
                                                  "PQ8"]
    assert [c.spec for c in map(lambda c: with_lists(c, 10**6), code_ladder(256))][-1] == "OPQ8_32,IVF4096,PQ8"
    assert [c.code for c in code_ladder(101)][:5] == ["Flat", "SQ8", "SQ6", "SQ4", "PQ16"]
    for dim in (32, 101, 256, 2048):
        sizes = [c.code_bytes for c in code_ladder(dim)]
        assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("n", [120_000, 500_000, 3_000_000, 80_000_000])
@pytest.mark.parametrize("dim", [64, 256, 768, 2048])
@pytest.mark.parametrize("bytes_per_vector", [24, 60, 150, 200, 400, 1200, 9000])
def test_auto_uses_the_budget_without_exceeding_it(n, dim, bytes_per_vector):
    budget = n * bytes_per_vector
    try:
        spec, reason = auto_spec(n, dim, budget)
    except UsageError as exc:
        assert "raise --max-index-memory" in str(exc)
        assert with_lists(code_ladder(dim)[-1], n).bytes(n) > budget
        return
    layout = layout_of(spec, dim)
    assert layout is not None and layout.bytes(n) <= budget and layout.nlist == nlist_for(n)
    ladder = [with_lists(c, n) for c in code_ladder(dim)]
    better = ladder[:[c.spec for c in ladder].index(spec)]
    assert all(c.bytes(n) > budget for c in better), "a more faithful code fits the budget"
    assert all(f"{c.code} (" in reason for c in better) and f"{layout.code} needs" in reason


def test_auto_specs_are_valid_factory_strings():
    for n, dim, budget in [(500_000, 256, 100 << 20), (500_000, 256, 10 << 20), (2_000_000, 101, 200 << 20),
                           (40_000_000, 2048, 60 << 30)]:
        spec, _ = auto_spec(n, dim, budget)
        index = make_index(spec, dim, "ip")
        assert index.d == dim and not index.is_trained

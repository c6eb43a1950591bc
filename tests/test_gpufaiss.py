from __future__ import annotations

import faiss
import numpy as np
import pytest
from helpers import clustered, make_run

from featshard.errors import UsageError
from featshard.index import merge
from featshard.index import reader as fx
from featshard.index.faissutil import faiss_metric
from featshard.index.gpufaiss import (
    Placement, add_assigned, assignment_indexes, gpu_free_memory, padded_flat, product_quantizer, takes_assignments,
    workload_of,
)
from featshard.index.spec import make_index

faiss.omp_set_num_threads(1)  # shared 2-core box: OpenMP threads spinning under load are ~20x slower


@pytest.fixture(scope="module")
def data():
    return clustered(4000, 32, seed=5, clusters=50, spread=1.0)


def centroids(index):
    ivf = faiss.extract_index_ivf(index)
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def list_contents(index):
    ivf = faiss.extract_index_ivf(index)
    out = []
    for i in range(ivf.nlist):
        size = ivf.invlists.list_size(i)
        ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(i), size).copy()
        codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(i), size * ivf.code_size).copy()
        out.append((ids.tolist(), codes.tobytes()))
    return out


@pytest.mark.parametrize("spec, metric", [("IVF32,Flat", "ip"), ("IVF32,Flat", "l2"), ("IVF32_HNSW16,SQ8", "ip")])
def test_a_separate_clustering_index_trains_the_same_quantizer(data, spec, metric):
    """The code path a GPU plan takes (IndexIVF.clustering_index), run with a CPU flat index."""
    plain, attached = make_index(spec, 32, metric), make_index(spec, 32, metric)
    plain.train(data)
    ivf = faiss.extract_index_ivf(attached)
    kind = faiss_metric(metric) if ivf.quantizer_trains_alone == 0 else faiss.METRIC_L2
    clustering = faiss.IndexFlat(32, kind)
    with assignment_indexes(attached, clustering, None):
        attached.train(data)
    assert clustering.ntotal == 32  # the k-means ran on it: it holds the final centroids
    assert ivf.clustering_index is None  # detached: never saved with the index
    assert np.allclose(centroids(plain), centroids(attached), atol=1e-5)


def test_padded_flat_search_equals_the_plain_2d_search(data):
    flat, padded = faiss.IndexFlatL2(2), padded_flat(2)
    flat.add(data[:256, :2])
    padded.add(data[:256, :2])
    dist, ids = flat.search(data[:, 2:4], 3)
    pdist, pids = padded.search(data[:, 2:4], 3)
    assert np.array_equal(ids, pids) and np.allclose(dist, pdist, atol=1e-6)


def test_pq_trained_with_padded_assignment_encodes_as_well(data):
    x = np.ascontiguousarray(data[:2000, :8])
    plain, placed = make_index("PQ4", 8, "l2"), make_index("PQ4", 8, "l2")
    plain.train(x)
    cpu = Placement()
    assert isinstance(cpu.trainers(placed)[1], faiss.IndexPreTransform)  # 2-dim sub-vectors: padded
    with cpu.training(placed):
        placed.train(x)
    assert product_quantizer(placed).assign_index is None and cpu.seconds["train"] > 0

    def error(index):
        pq = product_quantizer(index)
        return float(((pq.decode(pq.compute_codes(x)) - x) ** 2).sum(1).mean())

    assert abs(error(placed) - error(plain)) <= 0.03 * error(plain)


@pytest.mark.parametrize("spec", ["IVF32,Flat", "IVF32,PQ8", "IVF32,SQ6", "OPQ4_16,IVF32,PQ4"])
def test_adding_with_a_separate_assigner_stores_the_same_lists(data, spec):
    """The code path a GPU add takes (list numbers from a copy of the quantizer), run with a CPU copy."""
    index = make_index(spec, 32, "ip")
    if spec.startswith("OPQ"):
        faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0)).niter = 3
    index.train(data[:1000])
    twin = faiss.clone_index(index)
    ids = np.arange(len(data), dtype=np.int64) * 3
    index.add_with_ids(data, ids)
    copy = faiss.clone_index(faiss.downcast_index(faiss.extract_index_ivf(twin).quantizer))
    for lo in range(0, len(data), 1500):
        add_assigned(twin, ids[lo:lo + 1500], data[lo:lo + 1500], copy)
    assert twin.ntotal == index.ntotal == len(data)
    assert list_contents(twin) == list_contents(index)
    assert takes_assignments(twin)
    for other in ("IVF32,PQ16x4fs", "IVF32,PQ8,RFlat", "HNSW8"):
        index = make_index(other, 32, "ip")
        assert not takes_assignments(index) and not workload_of(index).preassign


def test_the_cpu_plan_and_its_record(data):
    index = make_index("IVF32,PQ8", 32, "ip")
    work = workload_of(index)
    assert (work.nlist, work.ivf_dim, work.flat_quantizer, work.trains, work.exact) == (32, 32, True, True, False)
    assert workload_of(make_index("Flat", 32, "ip")).exact
    assert not workload_of(make_index("IVF64_HNSW16,Flat", 32, "l2")).flat_quantizer
    place = Placement.for_index(index, False)
    assert not place.plan.uses_gpu and place.knn() is faiss.knn
    with place.timed("tune"):
        pass
    assert place.meta()["tune"]["device"] == "cpu" and place.meta()["tune"]["seconds"] >= 0
    assert gpu_free_memory(False) == []
    if faiss.get_num_gpus() == 0:
        with pytest.raises(UsageError, match="faiss sees no GPU"):
            Placement.for_index(index, True)


def test_add_records_where_it_ran(tmp_path, data):
    make_run(tmp_path / "a", data[:3000], 2, "fp", fingerprint_fields={"model": "m", "input_sha256": "a"})
    make_run(tmp_path / "b", data[3000:], 1, "fp-b", fingerprint_fields={"model": "m", "input_sha256": "b"})
    merge.build(tmp_path / "a", "IVF16,SQ8")
    from featshard.index.add import add_run

    meta = add_run(tmp_path / "a", tmp_path / "b")
    steps = meta["steps"]
    assert set(steps) == {"train", "add", "tune", "add_run"} and steps["add_run"]["device"] == "cpu"
    assert steps["add_run"]["from"] == str(tmp_path / "b") and steps["add_run"]["seconds"] > 0
    assert fx.load_index(tmp_path / "a").ntotal == 4000


def _need_faiss_gpu() -> None:
    if faiss.get_num_gpus() == 0:
        pytest.skip("faiss sees no GPU (faiss-cpu build)")


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["IVF64,Flat", "IVF64,PQ16", "IVF64_HNSW32,SQ8"])
def test_gpu_plan_builds_the_index_the_cpu_builds(tmp_path, spec):
    _need_faiss_gpu()
    vectors = clustered(20_000, 32, seed=7, clusters=200, spread=1.0)
    make_run(tmp_path / "run", vectors, 2, "fp")
    cpu = merge.build(tmp_path / "run", spec, gpu=False)
    gpu = merge.build(tmp_path / "run", spec, gpu=True)
    assert gpu["gpu"] is True and gpu["steps"]["train"]["device"].startswith("gpu:")
    assert gpu["steps"]["tune"]["device"].startswith("gpu:")
    if "HNSW" in spec:
        assert gpu["steps"]["add"]["device"] == "cpu"  # an HNSW quantizer assigns on the CPU
    else:
        assert gpu["steps"]["add"]["device"].startswith("gpu:")
    assert gpu["ntotal"] == cpu["ntotal"] == 20_000
    assert gpu["recall_at_10"] >= cpu["recall_at_10"] - 0.02
    assert all(f > 0 for f in gpu_free_memory(True))


@pytest.mark.gpu
def test_gpu_add_of_another_run_and_sharded_training(tmp_path):
    _need_faiss_gpu()
    vectors = clustered(12_000, 64, seed=8, clusters=100, spread=1.0)
    make_run(tmp_path / "a", vectors[:8000], 2, "fp", fingerprint_fields={"model": "m", "input_sha256": "a"})
    make_run(tmp_path / "b", vectors[8000:], 1, "fp-b", fingerprint_fields={"model": "m", "input_sha256": "b"})
    merge.build(tmp_path / "a", "IVF128,PQ32", gpu=True)
    from featshard.index.add import add_run

    meta = add_run(tmp_path / "a", tmp_path / "b", gpu=True)
    assert meta["steps"]["add_run"]["device"].startswith("gpu:") and meta["ntotal"] == 12_000
    _, ids = fx.load_index(tmp_path / "a").search(vectors[[5, 9000]], 1)
    assert ids[:, 0].tolist() == [5, 8000 + 1000]
    index = make_index("IVF128,Flat", 64, "ip")
    place = Placement.for_index(index, True)
    from featshard.index.gpuplan import Step

    shards = Step(place.plan.train.device, shard=faiss.get_num_gpus() > 1, float16=True)
    clustering = place.gpu_flat(64, faiss.METRIC_INNER_PRODUCT, shards)
    with assignment_indexes(index, clustering, None):
        index.train(vectors)
    assert index.is_trained and faiss.extract_index_ivf(index).quantizer.ntotal == 128

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from runfactory import clustered, make_run

from featshard.index import reader as fx
from featshard.index import merge
from featshard.errors import FeatshardError
from featshard.index.faissutil import is_exact
from featshard.index.recall import exact_knn, recall_at, tunable
from featshard.index.spec import make_index
from featshard.index.vectors import check_source, gather, sample_positions, source_of

faiss.omp_set_num_threads(1)  # shared 2-core box: OpenMP threads spinning under load are ~20x slower


@pytest.fixture()
def run(tmp_path):
    vectors = clustered(1200, 32, seed=3)
    make_run(tmp_path / "run", vectors, 3, "fp-a", failed_rows=[7, 400, 1199])
    return tmp_path / "run", vectors


def test_lookup_names_rows_of_every_shard_and_unknowns(run):
    run_dir, _ = run
    merge.build(run_dir)
    loaded = fx.load_index(run_dir)
    got = loaded.lookup([1198, 0, 401, 7, -1, 5000])
    where = str(run_dir.resolve())
    assert got[:3] == [("img01198.jpg", where, 1198), ("img00000.jpg", where, 0), ("img00401.jpg", where, 401)]
    assert got[3] == (None, where, 7)  # a failed row: in the plan, not stored
    assert got[4] == (None, None, -1) and got[5] == (None, None, -1)


def test_search_returns_row_ids_and_stored_ids_match_rows(run):
    run_dir, vectors = run
    merge.build(run_dir)
    loaded = fx.load_index(run_dir)
    scores, ids = loaded.search(vectors[[3, 900]], 1)
    assert ids[:, 0].tolist() == [3, 900] and np.allclose(scores[:, 0], 1.0, atol=1e-5)
    expected = sorted(set(range(1200)) - {7, 400, 1199})
    assert sorted(fx.stored_ids(loaded.index).tolist()) == expected
    merge.build(run_dir, "IVF8,Flat")
    assert sorted(fx.stored_ids(fx.load_index(run_dir).index).tolist()) == expected


def test_gather_returns_the_rows_at_global_positions_dense_and_sparse(run):
    run_dir, vectors = run
    src = check_source(source_of(run_dir))
    assert src.counts == [399, 399, 399]
    stored = np.array(sorted(set(range(1200)) - {7, 400, 1199}))
    for positions in (np.arange(0, 1197, 2), np.array([0, 398, 399, 1196]), sample_positions(1197, 50, 1)):
        ids, vecs = gather([src], positions, batch_rows=100)
        assert ids.tolist() == stored[positions].tolist()
        assert np.array_equal(vecs, vectors[stored[positions]])


def test_sample_positions_span_every_shard(run):
    run_dir, _ = run
    src = check_source(source_of(run_dir))
    ids, _ = gather([src], sample_positions(1197, 60, seed=0), batch_rows=256)
    assert len(set(ids.tolist())) == 60
    assert {int(i) // 400 for i in ids} == {0, 1, 2}
    assert not np.array_equal(sample_positions(1197, 60, 0), sample_positions(1197, 60, 1))


def test_exact_knn_streams_to_the_brute_force_answer(run):
    run_dir, vectors = run
    src = check_source(source_of(run_dir))
    stored = np.array(sorted(set(range(1200)) - {7, 400, 1199}))
    queries = vectors[[5, 600, 1000]]
    for metric in ("ip", "l2"):
        truth = exact_knn(queries, [src], 10, metric)
        if metric == "ip":
            ref = np.argsort(-(queries @ vectors[stored].T), axis=1)[:, :10]
        else:
            ref = np.argsort(((queries[:, None] - vectors[stored][None]) ** 2).sum(-1), axis=1)[:, :10]
        assert truth.tolist() == stored[ref].tolist()


def test_recall_at_counts_overlap():
    truth = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    found = np.array([[4, 3, 9, 8], [6, 5, 7, 1]])
    assert recall_at(found, truth) == pytest.approx((0.5 + 1.0) / 2)


def test_tunable_parameters_by_index_kind():
    assert tunable(faiss.index_factory(8, "IVF16,Flat")) == ("nprobe", [1, 2, 4, 8, 16])
    assert tunable(faiss.index_factory(8, "IVF12,Flat"))[1][-2:] == [8, 12]
    assert tunable(make_index("HNSW8", 8, "ip"))[0] == "efSearch"
    assert tunable(make_index("Flat", 8, "ip")) == (None, [])
    assert is_exact(make_index("Flat", 8, "ip"))
    assert not is_exact(make_index("PCA4,Flat", 8, "ip"))


def test_load_index_without_index_or_with_a_stale_json_is_refused(run):
    run_dir, _ = run
    with pytest.raises(FeatshardError, match="featshard merge"):
        fx.load_index(run_dir)
    merge.build(run_dir)
    meta_path = run_dir / "index" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "ntotal": 5}))
    with pytest.raises(FeatshardError, match="holds 1197 vectors but index.json says 5"):
        fx.load_index(run_dir)


def test_changed_source_run_is_detected(run):
    run_dir, _ = run
    merge.build(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    (run_dir / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "other"}))
    with pytest.raises(FeatshardError, match="changed since"):
        fx.load_index(run_dir)

from __future__ import annotations

import json

import faiss
import h5py
import numpy as np
import pytest
from helpers import clustered, make_run

from featshard import cli
from featshard.tools import indexbench
from featshard.index import merge
from featshard.index import reader as fx
from featshard.errors import FeatshardError, UsageError
from featshard.store.plan import shard_name
from featshard.index.faissutil import apply_params
from featshard.index.recall import recall_at
from featshard.index.autospec import auto_spec, nlist_for
from featshard.index.gpufaiss import use_gpu
from featshard.index.spec import choose_train_size, make_index, parse_size, train_bounds
from featshard.store.rundir import RunDir

faiss.omp_set_num_threads(1)  # shared 2-core box: OpenMP threads spinning under load are ~20x slower

FAILED = [3, 250, 1999]


@pytest.fixture()
def run(tmp_path):
    vectors = clustered(2000, 32, seed=1, clusters=30, spread=1.0)
    make_run(tmp_path / "run", vectors, 4, "fp-1", failed_rows=FAILED)
    return tmp_path / "run", vectors


def stored(n: int = 2000) -> np.ndarray:
    return np.array(sorted(set(range(n)) - set(FAILED)))


def test_streaming_flat_equals_an_in_memory_build(run):
    run_dir, vectors = run
    meta = merge.build(run_dir)
    ref = faiss.IndexIDMap2(faiss.IndexFlatIP(32))
    ref.add_with_ids(vectors[stored()], stored())
    loaded = fx.load_index(run_dir)
    assert loaded.ntotal == ref.ntotal == meta["ntotal"] == 1997
    assert sorted(fx.stored_ids(loaded.index).tolist()) == stored().tolist()
    queries = clustered(50, 32, seed=9, clusters=30, spread=1.0)
    got_scores, got_ids = loaded.search(queries, 10)
    ref_scores, ref_ids = ref.search(queries, 10)
    assert np.array_equal(got_ids, ref_ids) and np.allclose(got_scores, ref_scores, atol=1e-6)
    assert meta["recall_at_10"] == 1.0 and meta["search_params"] == {}


def test_index_json_describes_the_build(run):
    run_dir, _ = run
    meta = merge.build(run_dir, "IVF16,Flat", train_size=800)
    on_disk = json.loads((run_dir / "index" / "index.json").read_text())
    assert on_disk == meta
    for key in ("spec", "spec_reason", "metric", "ntotal", "dim", "search_params", "recall_at_10", "build_seconds",
                "peak_rss_bytes", "index_bytes", "train_size", "sources", "on_disk"):
        assert key in meta
    assert meta["train_size"] == 800 and meta["dim"] == 32 and meta["metric"] == "ip"
    assert meta["sources"] == [{"run_dir": str(run_dir.resolve()), "relpath": ".", "fingerprint": "fp-1",
                                "id_offset": 0, "rows": 2000, "stored": 1997}]
    assert meta["index_bytes"] == (run_dir / "index" / "index.faiss").stat().st_size
    assert meta["index_bytes"] <= meta["estimated_bytes"] <= meta["index_bytes"] + 8192
    assert meta["gpu"] is False and list(meta["steps"]) == ["train", "add", "tune"]
    assert all(step["device"] == "cpu" and step["seconds"] >= 0 and step["note"] for step in meta["steps"].values())
    assert not [p.name for p in (run_dir / "index").iterdir() if ".tmp" in p.name]


def test_ivf_on_a_cross_shard_sample_reaches_the_target_recall(run):
    run_dir, vectors = run
    meta = merge.build(run_dir, "IVF32,Flat", target_recall=0.95)
    assert meta["search_params"]["nprobe"] > 1  # this data needs tuning: one list is not enough
    assert meta["recall_at_10"] >= 0.95 and meta["recall_queries"] == 1000
    loaded = fx.load_index(run_dir)  # independent check with fresh queries and brute force
    queries = vectors[stored()][::10]
    truth = stored()[np.argsort(-(queries @ vectors[stored()].T), axis=1)[:, :10]]
    assert recall_at(loaded.search(queries, 10)[1], truth) >= 0.93


def test_on_disk_merge_answers_like_the_in_ram_ivf(run):
    run_dir, vectors = run
    ram_meta = merge.build(run_dir, "IVF32,Flat")
    ram = fx.load_index(run_dir).index
    disk_meta = merge.build(run_dir, "IVF32,Flat", on_disk=True)
    files = sorted(p.name for p in (run_dir / "index").iterdir())
    assert files == sorted(["index.faiss", "index.json", "trained.faiss", disk_meta["ivfdata"]])
    disk = fx.load_index(run_dir)
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(disk.index).invlists)
    assert isinstance(invlists, faiss.OnDiskInvertedLists)
    assert disk_meta["search_params"] == ram_meta["search_params"] and disk.ntotal == 1997
    queries = clustered(40, 32, seed=5, clusters=30, spread=1.0)
    for nprobe in (1, 4, 32):
        apply_params(ram, {"nprobe": nprobe})
        apply_params(disk.index, {"nprobe": nprobe})
        (ds, di), (rs, ri) = disk.index.search(queries, 10), ram.search(queries, 10)
        assert np.array_equal(di, ri) and np.allclose(ds, rs, atol=1e-5)
    assert sorted(fx.stored_ids(disk.index).tolist()) == stored().tolist()


def test_rebuilding_in_ram_drops_the_on_disk_files(run):
    run_dir, _ = run
    merge.build(run_dir, "IVF8,Flat", on_disk=True)
    merge.build(run_dir)
    assert sorted(p.name for p in (run_dir / "index").iterdir()) == ["index.faiss", "index.json"]


def _set_attr(path, key, value):
    with h5py.File(path, "r+") as h5:
        h5.attrs[key] = value


@pytest.mark.parametrize("damage, message", [
    ("incomplete", r"shard shard-00002-of-00004 .* is incomplete"),
    ("fingerprint", r"shard shard-00002-of-00004 .* has fingerprint 'fp-other' but the manifest says 'fp-1'"),
    ("missing", r"shard shard-00002-of-00004 .* is missing"),
])
def test_bad_shards_are_refused_naming_the_shard(run, damage, message):
    run_dir, _ = run
    path = RunDir(run_dir).shard(shard_name(2, 4))
    if damage == "incomplete":
        _set_attr(path, "complete", False)
    elif damage == "fingerprint":
        _set_attr(path, "fingerprint", "fp-other")
    else:
        path.unlink()
    with pytest.raises(FeatshardError, match=message):
        merge.build(run_dir)
    assert cli.main(["merge", str(run_dir)]) == 1
    assert not (run_dir / "index" / "index.faiss").exists()


@pytest.mark.parametrize("n, dim, memory, expected", [
    (50_000, 256, 8 << 30, "Flat"),
    (500_000, 256, 8 << 30, "IVF2048,Flat"),
    (20_000_000, 256, 64 << 30, "IVF16384_HNSW32,Flat"),
    (5_000_000, 256, 1 << 30, "IVF8192,SQ6"),
    (100_000_000, 512, 16 << 30, "IVF32768_HNSW32,PQ128"),
    (1_000_000, 100, 48 << 20, "IVF4096,PQ25"),
    (150_000, 2048, 2 << 30, "IVF2048,Flat"),
    (50_000, 2048, 100 << 20, "IVF1024,SQ6"),
    (500_000, 256, 100 << 20, "IVF2048,SQ6"),
    (500_000, 256, 100_000_000, "IVF2048,PQ128"),
    (1_000_000_000, 2048, 100 << 30, "OPQ96_384,IVF131072_HNSW32,PQ96"),
])
def test_auto_spec_follows_the_documented_rule(n, dim, memory, expected):
    spec, reason = auto_spec(n, dim, memory)
    assert spec == expected and reason
    faiss.index_factory(dim, spec)  # a valid factory string


def test_auto_spec_errors_and_on_disk():
    with pytest.raises(UsageError, match="do not fit"):
        auto_spec(10**9, 256, 1 << 30)
    assert auto_spec(50_000, 64, 8 << 30, on_disk=True)[0].startswith("IVF")
    assert nlist_for(10) == 1 and nlist_for(1_000_000) == 4096


def test_auto_through_merge_records_the_reason(run):
    run_dir, _ = run
    meta = merge.build(run_dir, "auto", max_memory=1 << 30)
    assert meta["spec"] == "Flat" and "exact" in meta["spec_reason"]
    meta = merge.build(run_dir, "auto", max_memory=100_000)
    assert meta["spec"] == "IVF32,SQ8" and "Flat (" in meta["spec_reason"] and "too big" in meta["spec_reason"]
    assert meta["index_bytes"] <= meta["estimated_bytes"] <= 100_000


@pytest.mark.parametrize("spec", ["IVFxx,Flat", "PQ7", "", "Nonsense"])
def test_bad_spec_is_a_usage_error(run, spec):
    run_dir, _ = run
    with pytest.raises(UsageError, match="--index-spec"):
        merge.build(run_dir, spec)
    assert cli.main(["merge", str(run_dir), "--index-spec", spec]) == 2


def test_too_few_vectors_for_the_lists_and_on_disk_flat_are_refused(run):
    run_dir, _ = run
    with pytest.raises(FeatshardError, match=r"needs at least 4096 training vectors .* only 1997"):
        merge.build(run_dir, "IVF4096,Flat")
    with pytest.raises(UsageError, match="--on-disk needs an IVF spec"):
        merge.build(run_dir, "Flat", on_disk=True)
    with pytest.raises(UsageError, match="--train-size 10 is below the 32"):
        merge.build(run_dir, "IVF32,Flat", train_size=10)


def test_train_size_defaults_from_the_spec():
    ivf = make_index("IVF64,Flat", 32, "ip")
    assert train_bounds(ivf) == (64, 39 * 64)
    assert choose_train_size(ivf, "IVF64,Flat", None, 10**6) == 10_000
    assert choose_train_size(ivf, "IVF64,Flat", None, 5000) == 5000
    big = make_index("IVF1024,PQ8", 32, "ip")
    assert train_bounds(big) == (1024, 39 * 1024)
    assert choose_train_size(big, "IVF1024,PQ8", None, 10**6) == 39 * 1024
    assert train_bounds(make_index("PQ8", 32, "ip")) == (256, 39 * 256)


def test_gpu_decision_and_sizes():
    assert use_gpu(None, 0) is False and use_gpu(None, 2) is True
    assert use_gpu(False, 2) is False and use_gpu(True, 1) is True
    with pytest.raises(UsageError, match="no GPU"):
        use_gpu(True, 0)
    assert parse_size("4G") == 4 << 30 and parse_size("512MiB") == 512 << 20
    assert parse_size("1000") == 1000 and parse_size("1.5k") == 1536
    with pytest.raises(UsageError):
        parse_size("lots")


def test_ids_wrap_only_where_needed():
    assert isinstance(make_index("Flat", 8, "ip"), faiss.IndexIDMap2)
    assert isinstance(make_index("HNSW8", 8, "l2"), faiss.IndexIDMap2)
    assert faiss.try_extract_index_ivf(make_index("IVF4,Flat", 8, "ip")) is not None
    assert not isinstance(make_index("IVF4,Flat", 8, "ip"), faiss.IndexIDMap2)
    assert isinstance(make_index("IVF4,PQ4x4fs,RFlat", 8, "ip"), faiss.IndexIDMap2)  # IndexRefine takes no ids


def test_a_refined_ivf_merges_and_finds_rows(run):
    run_dir, vectors = run
    meta = merge.build(run_dir, "IVF16,PQ8x4fs,Refine(SQ8)")
    assert meta["ntotal"] == 1997 and "nprobe" in meta["search_params"]
    _, ids = fx.load_index(run_dir).search(vectors[[10, 1500]], 1)
    assert ids[:, 0].tolist() == [10, 1500]


def test_cli_merge_with_l2_and_hnsw(run):
    run_dir, vectors = run
    assert cli.main(["merge", str(run_dir), "--index-spec", "HNSW16", "--metric", "l2", "--target-recall", "0.9"]) == 0
    loaded = fx.load_index(run_dir)
    assert loaded.meta["metric"] == "l2" and "efSearch" in loaded.meta["search_params"]
    assert loaded.meta["recall_at_10"] >= 0.9
    dist, ids = loaded.search(vectors[[10, 1500]], 1)
    assert ids[:, 0].tolist() == [10, 1500] and np.allclose(dist[:, 0], 0, atol=1e-5)


def test_float16_shards_merge_like_their_float32_values(tmp_path):
    vectors = clustered(500, 16, seed=2)
    make_run(tmp_path / "run", vectors, 2, "fp", dtype="float16")
    merge.build(tmp_path / "run")
    loaded = fx.load_index(tmp_path / "run")
    ref = faiss.IndexFlatIP(16)
    ref.add(vectors.astype(np.float16).astype(np.float32))
    assert np.array_equal(loaded.search(vectors[:20], 5)[1], ref.search(vectors[:20], 5)[1])


def test_index_bench_reports_both_builds(tmp_path, capsys):
    result = indexbench.run_index_bench(tmp_path, n=3000, dim=16, seed=1, ivf_spec="IVF16,Flat", repeats=1,
                                        threads=1)
    assert [(b["kind"], b["spec"]) for b in result["builds"]] == [("merge", "Flat"), ("plain", "Flat"),
                                                                    ("merge", "IVF16,Flat"), ("plain", "IVF16,Flat")]
    merged_flat, plain_flat, merged_ivf, plain_ivf = result["builds"]
    assert merged_flat["recall_at_10"] == plain_flat["recall_at_10"] == 1.0
    assert merged_flat["index_bytes"] == plain_flat["index_bytes"]
    assert merged_ivf["recall_at_10"] >= 0.95 and plain_ivf["recall_at_10"] >= 0.9
    assert all(b["peak_rss_bytes"] > b["rss_after_imports"] > 0 for b in result["builds"])
    printed = capsys.readouterr().out
    assert printed.startswith("build  spec") and printed.count("(target <= 1.2)") == 2
    assert (tmp_path / "index_bench.json").is_file() and not (tmp_path / "index-bench-run").exists()

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from helpers import clustered, make_run

from featshard import cli
from featshard.index import add
from featshard.index import merge
from featshard.index import reader as fx
from featshard.errors import FeatshardError, UsageError

faiss.omp_set_num_threads(1)  # shared 2-core box: OpenMP threads spinning under load are ~20x slower

FIELDS = {"model": "synthetic", "weights": "w1", "layer": "avgpool", "dtype": "float32", "input_sha256": "list-a"}


@pytest.fixture()
def runs(tmp_path):
    a = clustered(1500, 32, seed=1, clusters=30, spread=1.0)
    b = clustered(700, 32, seed=2, clusters=30, spread=1.0)
    make_run(tmp_path / "a", a, 3, "fp-a", failed_rows=[1499], fingerprint_fields=FIELDS)
    make_run(tmp_path / "b", b, 2, "fp-b", failed_rows=[0], names=[f"b/{i}.png" for i in range(700)],
             fingerprint_fields={**FIELDS, "input_sha256": "list-b"})
    return tmp_path / "a", a, tmp_path / "b", b


@pytest.mark.parametrize("spec, on_disk", [("Flat", False), ("IVF16,Flat", False), ("IVF16,Flat", True)])
def test_add_then_search_finds_vectors_of_both_runs(runs, spec, on_disk):
    run_a, a, run_b, b = runs
    merge.build(run_a, spec, on_disk=on_disk)
    meta = add.add_run(run_a, run_b)
    offset = meta["sources"][1]["id_offset"]
    assert offset == 1500  # past every id of run a (rows 0..1499)
    assert meta["ntotal"] == 1499 + 699 and [s["stored"] for s in meta["sources"]] == [1499, 699]
    loaded = fx.load_index(run_a)
    assert loaded.ntotal == 2198
    _, ids = loaded.search(np.concatenate([a[[5, 1000]], b[[1, 699 - 1]]]), 1)
    assert ids[:, 0].tolist() == [5, 1000, offset + 1, offset + 698]
    names = loaded.lookup(ids[:, 0])
    assert [n[0] for n in names] == ["img00005.jpg", "img01000.jpg", "b/1.png", "b/698.png"]
    assert names[2][1] == str(run_b.resolve()) and names[2][2] == 1
    ids_all = np.sort(fx.stored_ids(loaded.index))
    expected = sorted(list(range(1499)) + [offset + r for r in range(1, 700)])
    assert ids_all.tolist() == expected
    if spec != "Flat":
        assert meta["recall_at_10"] >= 0.95 and meta["search_params"]["nprobe"] >= 1


def test_on_disk_add_writes_a_new_ivfdata_and_drops_the_old(runs):
    run_a, _, run_b, _ = runs
    first = merge.build(run_a, "IVF16,Flat", on_disk=True)
    second = add.add_run(run_a, run_b)
    files = sorted(p.name for p in (run_a / "index").iterdir())
    assert second["ivfdata"] != first["ivfdata"] and second["ivfdata"] in files
    assert first["ivfdata"] not in files and "parts" not in files


def test_a_run_of_another_model_is_refused_saying_what_differs(runs, tmp_path):
    run_a, _, _, b = runs
    make_run(tmp_path / "c", b, 1, "fp-c", fingerprint_fields={**FIELDS, "layer": "features.18",
                                                                "input_sha256": "list-c"})
    merge.build(run_a)
    with pytest.raises(FeatshardError, match=r"what differs: layer: 'avgpool' -> 'features.18'"):
        add.add_run(run_a, tmp_path / "c")
    assert cli.main(["add", str(run_a), "--from", str(tmp_path / "c")]) == 1
    assert fx.load_index(run_a).ntotal == 1499  # untouched


def test_same_run_twice_and_other_dim_are_refused(runs, tmp_path):
    run_a, _, run_b, _ = runs
    merge.build(run_a)
    add.add_run(run_a, run_b)
    with pytest.raises(UsageError, match="already in the index"):
        add.add_run(run_a, run_b)
    make_run(tmp_path / "d", clustered(50, 16, seed=4), 1, "fp-a", fingerprint_fields=FIELDS)
    with pytest.raises(FeatshardError, match="16-dim vectors, the index 32"):
        add.add_run(run_a, tmp_path / "d")


def test_add_without_an_index_and_cli_success(runs):
    run_a, _, run_b, _ = runs
    with pytest.raises(FeatshardError, match="featshard merge"):
        add.add_run(run_a, run_b)
    assert cli.main(["merge", str(run_a), "--index-spec", "IVF8,Flat"]) == 0
    assert cli.main(["add", str(run_a), "--from", str(run_b), "--target-recall", "0.9"]) == 0
    meta = json.loads((run_a / "index" / "index.json").read_text())
    assert meta["recall_target"] == 0.9 and len(meta["sources"]) == 2 and "add_seconds" in meta


def test_vector_fields_ignore_only_the_input_list():
    assert add.vector_fields({"fingerprint_fields": FIELDS}) == {k: v for k, v in FIELDS.items()
                                                                if k != "input_sha256"}
    assert add.vector_fields({"fingerprint": "x"}) == {"fingerprint": "x"}

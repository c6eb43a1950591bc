"""featshard.tools.serve.rowfiles: ids -> stored rows, paths from the run's own input list, stored vectors."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from runfactory import make_run, normalize

from featshard.index.vectors import source_of
from featshard.store.inputs import open_input, scan_input
from featshard.tools.serve.rowfiles import RowFiles, path_table, run_names


def listed_run(tmp_path: Path, names: list[str], failed: tuple[int, ...] = (), offset: int = 0,
               run_name: str = "run", n_shards: int = 2) -> tuple[Path, np.ndarray]:
    """A synthetic run whose manifest points at a real input list of `names` (hash as `run` computes it)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    listing = tmp_path / f"{run_name}-list.txt"
    listing.write_text("".join(f"{n}\n" for n in names), encoding="utf-8", errors="surrogateescape")
    rows, sha = scan_input(open_input(listing))
    vectors = normalize(np.random.default_rng(len(names)).standard_normal((rows, 8)))
    make_run(tmp_path / run_name, vectors, n_shards, "fp", failed_rows=failed, names=names, input_path=str(listing))
    manifest_file = tmp_path / run_name / "manifest.json"
    manifest_file.write_text(manifest_file.read_text().replace('"sha256": "fp"', f'"sha256": "{sha}"'))
    return tmp_path / run_name, vectors


def test_ids_map_to_the_listed_paths_of_stored_rows_only(tmp_path):
    names = [f"pics/p{i}.jpg" for i in range(7)] + ["/abs/elsewhere/x.png", "odd name \udcff.jpg"]
    run, vectors = listed_run(tmp_path, names, failed=(2,))
    files = RowFiles.build([source_of(run)], tmp_path / "cache")
    (info,) = files.runs
    assert info.unavailable == "" and info.stored.tolist() == [i != 2 for i in range(9)]
    assert info.path(0) == str(tmp_path / "pics/p0.jpg")  # relative entries resolve against the list's folder
    assert info.path(7) == "/abs/elsewhere/x.png"  # the user's own data: absolute paths are theirs
    assert info.path(8) == str(tmp_path / "odd name \udcff.jpg")  # undecodable bytes survive the round trip
    assert files.locate(0) == (info, 0) and files.locate(8) == (info, 8)
    for bad in (-1, 2, 9, 10 ** 12):  # negative, a failed row, past the end
        assert files.locate(bad) is None and files.vector(bad) is None
    for ident in (0, 3, 4, 8):  # both shards, around the failed row
        assert np.array_equal(files.vector(ident), vectors[ident])


def test_the_table_is_memory_mapped_and_reused(tmp_path):
    run, _ = listed_run(tmp_path, [f"a{i}.jpg" for i in range(5)])
    cache = tmp_path / "cache"
    RowFiles.build([source_of(run)], cache)
    made = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert sorted(n.split("-")[0] for n in made) == ["offsets", "paths"]  # no temporary file left behind
    files = RowFiles.build([source_of(run)], cache)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == made  # read back, not rebuilt
    assert isinstance(files.runs[0].offsets, np.memmap) and files.runs[0].path(4) == str(tmp_path / "a4.jpg")


def test_a_changed_or_missing_input_list_serves_no_paths(tmp_path):
    run, _ = listed_run(tmp_path, [f"a{i}.jpg" for i in range(4)])
    listing = tmp_path / "run-list.txt"
    listing.write_text("a0.jpg\na1.jpg\nOTHER.jpg\na3.jpg\n")  # same count, another file in row 2
    files = RowFiles.build([source_of(run)], tmp_path / "cache")
    assert files.runs[0].path(2) is None and "changed since the run" in files.runs[0].unavailable
    assert files.locate(2) is not None  # still a stored row: search and neighbours go on
    assert not list((tmp_path / "cache").iterdir())
    os.unlink(listing)
    files = RowFiles.build([source_of(run)], tmp_path / "cache2")
    assert files.runs[0].path(0) is None and "does not exist" in files.runs[0].unavailable


def test_added_runs_are_offset_and_named(tmp_path):
    run_a, _ = listed_run(tmp_path / "a", [f"a{i}.jpg" for i in range(3)], run_name="run")
    run_b, vec_b = listed_run(tmp_path / "b", [f"b{i}.jpg" for i in range(4)], failed=(1,), run_name="run")
    files = RowFiles.build([source_of(run_a), source_of(run_b, id_offset=3)], tmp_path / "cache")
    assert [r.name for r in files.runs] == ["run#0", "run#1"]
    run, row = files.locate(5)
    assert run is files.runs[1] and row == 2 and run.path(row) == str(tmp_path / "b" / "b2.jpg")
    assert files.locate(4) is None  # row 1 of the added run failed
    assert np.array_equal(files.vector(6), vec_b[3])


def test_run_names_are_unique():
    assert run_names([Path("/x/a"), Path("/y/b")]) == ["a", "b"]
    assert run_names([Path("/x/a"), Path("/y/a"), Path("/z/c")]) == ["a#0", "a#1", "c"]


def test_path_table_refuses_a_list_with_other_rows(tmp_path):
    listing = tmp_path / "l.txt"
    listing.write_text("a\nb\nc\n")
    rows, sha = scan_input(open_input(listing))
    offsets, blob = path_table(str(listing), rows, sha, tmp_path / "c")
    assert offsets.tolist() == [0] + np.cumsum([len(str(tmp_path / x)) for x in "abc"]).tolist()
    with pytest.raises(Exception, match="more than the run's 2 rows"):
        path_table(str(listing), 2, "", tmp_path / "d")

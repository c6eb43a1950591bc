from __future__ import annotations

import csv
import io
import json

import shutil

import faiss
import numpy as np
import pytest
from helpers import FAST, mobilenet_weights
from PIL import Image
from runfactory import make_run, normalize

from featshard import cli
from featshard.index import dedup
from featshard.system import sha256_file
from featshard.index import merge

faiss.omp_set_num_threads(1)  # shared 2-core box: OpenMP threads spinning under load are ~20x slower

# planted groups: copy rows -> original row
PLANTED = {1000: 10, 1001: 10, 1002: 500, 1003: 777, 1004: 777, 1005: 777, 1006: 999}


def planted_vectors(seed: int = 0) -> np.ndarray:
    """1000 random distinct unit vectors (dim 64) plus slightly perturbed copies of a few of them."""
    rng = np.random.default_rng(seed)
    base = normalize(rng.standard_normal((1000, 64)))
    copies = [base[orig] + 0.01 * rng.standard_normal(64) for orig in PLANTED.values()]
    return np.concatenate([base, normalize(np.array(copies))])


def expected_groups() -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for copy, orig in PLANTED.items():
        groups.setdefault(orig, [orig]).append(copy)
    return sorted(sorted(g) for g in groups.values())


@pytest.mark.parametrize("spec, metric", [("Flat", "ip"), ("IVF16,Flat", "ip"), ("Flat", "l2")])
def test_planted_near_duplicates_are_found_and_nothing_else(tmp_path, spec, metric):
    make_run(tmp_path / "run", planted_vectors(), 3, "fp")
    merge.build(tmp_path / "run", spec, metric=metric, target_recall=0.99)
    result = dedup.dedup(tmp_path / "run")
    assert sorted(g["members"][0]["id"] for g in result.near) == [g[0] for g in expected_groups()]
    assert sorted([m["id"] for m in g["members"]] for g in result.near) == expected_groups()
    group = next(g for g in result.near if g["members"][0]["id"] == 777)
    assert [m["name"] for m in group["members"]] == ["img00777.jpg", "img01003.jpg", "img01004.jpg", "img01005.jpg"]
    if metric == "ip":
        assert group["score_min"] >= 0.9 and group["score_max"] <= 1.0001
    else:
        assert group["score_max"] <= 0.2
    assert result.threshold == dedup.DEFAULT_THRESHOLD[metric]


def test_no_false_groups_among_distinct_vectors(tmp_path):
    rng = np.random.default_rng(7)
    make_run(tmp_path / "run", normalize(rng.standard_normal((3000, 64))), 2, "fp")
    merge.build(tmp_path / "run")
    assert dedup.dedup(tmp_path / "run").near == []
    assert len(dedup.dedup(tmp_path / "run", threshold=-1.0, k=2).near) == 1  # everything joins: logic is live


def test_exact_groups_identical_files_only(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    contents = [b"alpha" * 100, b"bravo" * 100, b"alpha" * 100, b"charl" * 100, b"alpha" * 100, b"bravo" * 100,
                b"x" * 500]
    for i, data in enumerate(contents):
        (files / f"f{i}.jpg").write_bytes(data)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"files/f{i}.jpg\n" for i in range(len(contents))) + "files/gone.jpg\n")
    rng = np.random.default_rng(1)
    names = [f"files/f{i}.jpg" for i in range(len(contents))] + ["files/gone.jpg"]
    make_run(tmp_path / "run", normalize(rng.standard_normal((8, 16))), 2, "fp", names=names,
             input_path=str(listing), failed_rows=[7])
    merge.build(tmp_path / "run")
    result = dedup.dedup(tmp_path / "run", exact=True)
    groups = [[m["name"] for m in g["members"]] for g in result.exact]
    assert groups == [["files/f0.jpg", "files/f2.jpg", "files/f4.jpg"], ["files/f1.jpg", "files/f5.jpg"]]
    assert result.exact[0]["sha256"] == sha256_file(str(files / "f0.jpg"))


def test_cli_outputs_json_csv_text_and_file(tmp_path, capsys):
    make_run(tmp_path / "run", planted_vectors(), 2, "fp")
    assert cli.main(["merge", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert cli.main(["dedup", str(tmp_path / "run"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["near"]) == 4 and data["exact"] == []
    assert cli.main(["dedup", str(tmp_path / "run"), "--csv", "--threshold", "0.97"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["kind"] for r in rows} == {"near"} and len(rows) == 11 and rows[0]["name"] == "img00010.jpg"
    assert cli.main(["dedup", str(tmp_path / "run")]) == 0
    assert "4 near-duplicate groups" in capsys.readouterr().out
    out = tmp_path / "groups.json"
    assert cli.main(["dedup", str(tmp_path / "run"), "--json", "--out", str(out)]) == 0
    assert capsys.readouterr().out == "" and len(json.loads(out.read_text())["near"]) == 4
    assert cli.main(["dedup", str(tmp_path / "run"), "--k", "0"]) == 2


def test_union_find_merges_chains():
    sets = dedup.UnionFind()
    for a, b in [(5, 9), (9, 2), (7, 8)]:
        sets.union(a, b)
    assert sets.groups() == [[2, 5, 9], [7, 8]]


def _photos(folder):
    """Real photos from scikit-image, with a half-size JPEG, a JPEG-q50 copy and a byte-identical copy."""
    data = pytest.importorskip("skimage.data")
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "page"):
        Image.fromarray(getattr(data, name)()).convert("RGB").save(folder / f"{name}.png")
    astronaut = Image.open(folder / "astronaut.png")
    astronaut.resize((256, 256)).save(folder / "astronaut_half.jpg", quality=85)
    Image.open(folder / "coffee.png").save(folder / "coffee_q50.jpg", quality=50)
    shutil.copy(folder / "rocket.png", folder / "rocket_copy.png")
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.slow
def test_dedup_end_to_end_on_reencoded_and_resized_photos(tmp_path):
    names = _photos(tmp_path / "photos")
    (tmp_path / "list.txt").write_text("".join(f"photos/{n}\n" for n in names))
    run = str(tmp_path / "run")
    assert cli.main(["run", "--input", str(tmp_path / "list.txt"), "--out", run, "--gpus", "cpu:1",
                     *FAST, "--weights", mobilenet_weights()]) == 0
    assert cli.main(["merge", run]) == 0
    result = dedup.dedup(run, exact=True)
    near = sorted(sorted(m["name"] for m in g["members"]) for g in result.near)
    rocket = ["photos/rocket.png", "photos/rocket_copy.png"]
    assert near == [["photos/astronaut.png", "photos/astronaut_half.jpg"],
                    ["photos/coffee.png", "photos/coffee_q50.jpg"], rocket]
    assert [[m["name"] for m in g["members"]] for g in result.exact] == [rocket]

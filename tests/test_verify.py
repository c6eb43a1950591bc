"""`featshard verify`: a clean run (and its index) passes; each kind of damage, made on purpose to a copy of a real
run, is reported precisely (check name, counts, example rows) with exit status 1."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
from helpers import cli
from test_resume import shared_reference

from featshard.store import shards
from featshard.cli import main
from featshard.runner.verify import verify
from featshard.store.rundir import RunDir

S0, S1 = "shard-00000-of-00002", "shard-00001-of-00002"


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shared clean run (24 rows, row 20 failed: missing file) with a Flat index."""
    from featshard.index.merge import build

    _, ref = shared_reference(tmp_path_factory)
    run = tmp_path_factory.mktemp("verify") / "run"
    shutil.copytree(ref, run)
    build(run)
    return run


@pytest.fixture()
def run(indexed: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(indexed, copy)
    return copy


def problems(run: Path) -> dict[str, dict]:
    rep = verify(run)
    assert not rep.ok
    return {p["check"]: p for p in rep.problems}


def test_clean_run_and_index_pass(indexed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(indexed), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["problems"] == [] and rep["rows"] == 24
    assert rep["counts"] == {"feature_rows": 23, "failed_rows": 1, "missing_rows": 0, "duplicate_rows": 0,
                             "shards": 2, "index_ntotal": 23}
    assert rep["failure_reasons"] == {"missing": 1}
    proc = cli("verify", str(indexed))
    assert proc.returncode == 0 and "OK" in proc.stdout and "exactly once" in proc.stdout


def test_deleted_shard(run: Path) -> None:
    RunDir(run).shard(S1).unlink()
    proc = cli("verify", str(run))
    assert proc.returncode == 1 and "FAILED" in proc.stdout
    found = problems(run)
    assert "rows 12..23 are unaccounted for" in found["missing_shard"]["message"]
    assert found["missing_rows"]["message"].startswith("12 input rows") and found["missing_rows"]["examples"] == [
        12, 13, 14, 15, 16]
    assert found["index_extra"]["examples"][:2] == [12, 13]  # the index holds rows no shard has any more


def rewrite(run: Path, name: str, change: Callable[[shards.Block], shards.Block], dim: int | None = None) -> None:
    path = RunDir(run).shard(name)
    block, attrs = shards.read_block(path), shards.read_attrs(path)
    block = change(block)
    dim = dim or int(attrs["dim"])
    shards.write_block(path, block, {**attrs, "dim": dim}, dim, "float32")


def test_duplicated_row(run: Path) -> None:
    first = shards.read_block(RunDir(run).shard(S0))

    def add_row_3(b: shards.Block) -> shards.Block:
        return shards.Block(np.r_[3, b.rows], [first.names[3], *b.names], np.vstack([first.features[3], b.features]),
                            b.failed_rows, b.failed_names, b.failed_reasons)

    rewrite(run, S1, add_row_3)
    found = problems(run)
    assert found["duplicate_rows"]["message"] == "1 input rows are stored more than once"
    assert found["duplicate_rows"]["examples"] == [3]
    assert found["wrong_shard"]["examples"] == [3] and "[12, 24)" in found["wrong_shard"]["message"]


def test_nan_and_zero_vectors(run: Path) -> None:
    with h5py.File(RunDir(run).shard(S0), "r+") as h5:
        rows = h5["rows"][...].tolist()
        h5["features"][rows.index(5)] = np.nan
        h5["features"][rows.index(7)] = 0.0
    found = problems(run)
    assert found["nan_inf"]["examples"] == [5] and "1 NaN or inf" in found["nan_inf"]["message"]
    assert found["zero_norm"]["examples"] == [7]
    assert set(found) == {"nan_inf", "zero_norm"}


def test_wrong_dim(run: Path) -> None:
    def shrink(b: shards.Block) -> shards.Block:
        return shards.Block(b.rows, b.names, b.features[:, :8], b.failed_rows, b.failed_names, b.failed_reasons)

    rewrite(run, S0, shrink, dim=8)
    found = problems(run)
    assert "features have shape (12, 8), the manifest's dim is 1280" in found["dim"]["message"]


def test_wrong_names_and_fingerprint(run: Path) -> None:
    with h5py.File(RunDir(run).shard(S1), "r+") as h5:
        h5["names"][2] = "someone-else.jpg"
        h5.attrs["fingerprint"] = "0123456789abcdef"
    found = problems(run)
    assert found["names"]["examples"] == [14] and "1 stored names differ" in found["names"]["message"]
    assert "fingerprint '0123456789abcdef'" in found["fingerprint"]["message"]


def test_changed_input_list(run: Path) -> None:
    manifest = json.loads((run / "manifest.json").read_text())
    changed = run / "list-changed.txt"
    lines = Path(manifest["input"]["path"]).read_text().splitlines()
    changed.write_text("\n".join([*lines[:10], lines[0], *lines[11:]]) + "\n")  # row 10 now names another image
    manifest["input"]["path"] = str(changed)
    (run / "manifest.json").write_text(json.dumps(manifest))
    found = problems(run)
    assert found["names"]["examples"] == [10]
    assert "the input list changed since the run" in found["input"]["message"]


def test_index_missing_ids_and_holding_a_failed_row(run: Path) -> None:
    import faiss

    path = run / "index" / "index.faiss"
    index = faiss.read_index(str(path))
    index.remove_ids(faiss.IDSelectorArray(np.array([2, 9], np.int64)))
    index.add_with_ids(np.ones((1, index.d), np.float32), np.array([20], np.int64))  # row 20 failed: no feature
    faiss.write_index(index, str(path))
    meta = json.loads((run / "index" / "index.json").read_text())
    meta["ntotal"] = int(index.ntotal)
    (run / "index" / "index.json").write_text(json.dumps(meta))
    found = problems(run)
    assert found["index_missing"]["examples"] == [2, 9] and "2 feature rows" in found["index_missing"]["message"]
    assert found["index_extra"]["examples"] == [20]
    assert found["index_size"]["message"] == "index: ntotal 22 != 23 feature rows"


def test_index_that_does_not_load_is_reported(run: Path) -> None:
    meta = json.loads((run / "index" / "index.json").read_text())
    meta["ntotal"] = 99
    (run / "index" / "index.json").write_text(json.dumps(meta))
    assert "holds 23 vectors but index.json says 99" in problems(run)["index"]["message"]


def test_unordered_rows_and_unknown_reason_class(run: Path) -> None:
    def scramble(b: shards.Block) -> shards.Block:
        return shards.Block(b.rows[::-1], b.names[::-1], b.features[::-1], b.failed_rows, b.failed_names,
                            ["flaky: the network said no" for _ in b.failed_reasons])

    rewrite(run, S1, scramble)
    found = problems(run)
    assert "`rows` is not ascending" in found["order"]["message"]
    assert found["reasons"]["examples"] == [20] and "known class" in found["reasons"]["message"]
    assert set(found) == {"order", "reasons"}  # still every row once, names right

"""featshard.tools.export: the clip-retrieval (npy + metadata parquet) and parquet layouts, row-aligned with the
shards, streamed in slices, atomic, refusing incomplete runs; read back by the real embedding-reader and indexed by
the real autofaiss (in .venv-eco, see tests/helpers/ecosystem_read.py)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from featshard.errors import FeatshardError, UsageError
from featshard.tools import export as ex
from featshard.tools.export import export
from helpers import REPO, cli, read_all
from helpers import clustered, make_run

N, DIM, SHARDS = 900, 32, 4
FAILED = {5, 400, *range(675, 900)}  # the last shard has no vector at all


def eco_python() -> Path:
    """.venv-eco's python: FEATSHARD_ECO_PYTHON (`make test` sets it: then it must exist), else REPO/.venv-eco."""
    given = os.environ.get("FEATSHARD_ECO_PYTHON")
    path = Path(given) if given else REPO / ".venv-eco" / "bin" / "python"
    if not path.exists():
        if given:
            pytest.fail(f"FEATSHARD_ECO_PYTHON={given} does not exist (make eco-venv builds it)")
        pytest.skip(".venv-eco is missing: `make eco-venv` builds it (`make test` does)")
    return path


def read_with_peers(export_dir: Path, fmt: str, out: Path, index_key: str | None = None
                    ) -> tuple[np.ndarray, list[list], np.ndarray, dict]:
    script = REPO / "tests" / "helpers" / "ecosystem_read.py"
    proc = subprocess.run([str(eco_python()), str(script), str(export_dir), fmt, str(out),
                           *([index_key] if index_key else [])], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    meta = json.loads((out / "meta.json").read_text())
    return np.load(out / "vectors.npy"), meta, np.load(out / "found.npy"), json.loads((out / "info.json").read_text())


def stored(run: Path) -> dict[int, tuple[str, np.ndarray]]:
    """row -> (name, vector as stored) over all shards."""
    out = {}
    for data in read_all(run).values():
        names = [n.decode() if isinstance(n, bytes) else n for n in data["names"]]
        out.update({int(r): (n, f) for r, n, f in zip(data["rows"], names, data["features"])})
    return out


@pytest.fixture(params=["float32", "float16"])
def run(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    out = tmp_path / f"run-{request.param}"
    names = [f"{row // 100:05d}.tar/{row:09d}.jpg" for row in range(N)]
    make_run(out, clustered(N, DIM, seed=3), SHARDS, "fp-export", failed_rows=FAILED, names=names,
             dtype=request.param)
    return out


def test_clip_retrieval_layout_is_row_aligned_with_the_shards(run: Path, tmp_path: Path) -> None:
    result = export(run, "clip-retrieval", tmp_path / "exp")
    want = stored(run)
    dtype = read_all(run)["shard-00000-of-00004.h5"]["features"].dtype
    assert result.rows == len(want) == N - len(FAILED) and result.dim == DIM and result.dtype == str(dtype)
    assert sorted(result.files) == sorted([f"img_emb/img_emb_{i}.npy" for i in range(3)]
                                          + [f"metadata/metadata_{i}.parquet" for i in range(3)] + ["export.json"])
    seen = 0
    for i in range(3):
        vecs = np.load(tmp_path / "exp" / "img_emb" / f"img_emb_{i}.npy")
        meta = pq.read_table(tmp_path / "exp" / "metadata" / f"metadata_{i}.parquet").to_pydict()
        assert list(meta) == ["image_path", "row"] and vecs.dtype == dtype and len(vecs) == len(meta["row"])
        for row, name, vec in zip(meta["row"], meta["image_path"], vecs):
            assert want[row][0] == name and np.array_equal(want[row][1], vec)
        seen += len(vecs)
    assert seen == len(want)
    info = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert (info["exported"], info["dim"], info["fingerprint"]) == (len(want), DIM, "fp-export")
    assert not [p for p in (tmp_path / "exp").rglob("*") if ".tmp-" in p.name]


def test_parquet_layout_holds_row_name_and_fixed_size_embedding(run: Path, tmp_path: Path) -> None:
    export(run, "parquet", tmp_path / "exp")
    want = stored(run)
    files = sorted((tmp_path / "exp").glob("embeddings_*.parquet"))
    assert [f.name for f in files] == [f"embeddings_{i}.parquet" for i in range(3)]
    assert not (tmp_path / "exp" / "img_emb").exists()
    rows = []
    for f in files:
        table = pq.read_table(f)
        assert str(table.schema.field("embedding").type).startswith("fixed_size_list<element: half" if
                                                                     str(want[0][1].dtype) == "float16" else
                                                                     "fixed_size_list<element: float")
        emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        for row, name, vec in zip(table.column("row").to_pylist(), table.column("name").to_pylist(), emb):
            assert want[row][0] == name and np.array_equal(want[row][1], vec)
            rows.append(row)
    assert sorted(rows) == sorted(want) and len(set(rows)) == len(rows)


def test_slices_give_the_same_files(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    export(run, "clip-retrieval", tmp_path / "whole")
    monkeypatch.setattr(ex, "EXPORT_BATCH", 7)  # 225-row shards in 33 slices
    export(run, "clip-retrieval", tmp_path / "sliced")
    for i in range(3):
        name = f"img_emb/img_emb_{i}.npy"
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "sliced" / name).read_bytes()
        meta = f"metadata/metadata_{i}.parquet"
        assert pq.read_table(tmp_path / "whole" / meta).equals(pq.read_table(tmp_path / "sliced" / meta))
        assert pq.ParquetFile(tmp_path / "sliced" / meta).metadata.num_row_groups > 1


def test_incomplete_run_and_previous_export_are_refused(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    export(run, "clip-retrieval", out)
    with pytest.raises(UsageError, match="previous export"):
        export(run, "parquet", out)
    stale = out / "img_emb" / "img_emb_9.npy"
    stale.write_bytes(b"left from a bigger export")
    export(run, "clip-retrieval", out, overwrite=True)
    assert not stale.exists() and (out / "img_emb" / "img_emb_0.npy").is_file()
    shard = run / "shards" / "shard-00001-of-00004.h5"
    with h5py.File(shard, "r+") as h5:
        h5.attrs["complete"] = False
    with pytest.raises(FeatshardError, match="incomplete"):
        export(run, "clip-retrieval", tmp_path / "other")
    shard.unlink()
    with pytest.raises(FeatshardError, match="missing"):
        export(run, "parquet", tmp_path / "other")
    assert not (tmp_path / "other" / "img_emb").exists() and not list((tmp_path / "other").glob("*.parquet"))
    with pytest.raises(UsageError, match="--format"):
        export(run, "hdf5", tmp_path / "x")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["clip-retrieval", "parquet"])
def test_embedding_reader_and_autofaiss_read_the_export(run: Path, tmp_path: Path, fmt: str) -> None:
    proc = cli("export", str(run), "--format", fmt, "--out", str(tmp_path / "exp"), check=True)
    assert f"exported {N - len(FAILED)} vectors" in proc.stdout
    want = stored(run)
    vectors, meta, found, info = read_with_peers(tmp_path / "exp", fmt, tmp_path / "peers")
    assert info["count"] == info["ntotal"] == len(want) and info["dimension"] == DIM
    assert sorted(r for r, _ in meta) == sorted(want)
    for (row, name), vec in zip(meta, vectors):
        assert want[row][0] == name and np.array_equal(want[row][1].astype(np.float32), vec)
    assert info["index_key"] == "Flat" and np.array_equal(found, np.arange(len(meta)))  # autofaiss' own choice


@pytest.mark.slow
def test_autofaiss_opq_ivf_pq_index_over_the_export(tmp_path: Path) -> None:
    """A compressed index (OPQ rotation, IVF, PQ: what autofaiss picks for large sets) trains on the export and
    finds, for nearly every vector, one of its own cluster (cosine > 0.9; 1 in 100 by chance)."""
    run = tmp_path / "run"
    make_run(run, clustered(2000, 64, seed=4, clusters=100), 2, "fp-big")
    export(run, "clip-retrieval", tmp_path / "exp")
    vectors, meta, found, info = read_with_peers(tmp_path / "exp", "clip-retrieval", tmp_path / "peers",
                                                 "OPQ16_64,IVF16,PQ16x8")
    assert info["ntotal"] == 2000 and info["index_key"] == "OPQ16_64,IVF16,PQ16x8"
    cos = np.sum(vectors * vectors[found], axis=1)
    assert np.mean(cos > 0.9) > 0.95, np.mean(cos > 0.9)


def test_python_api_and_its_config(run: Path, tmp_path: Path) -> None:
    import featshard

    result = featshard.export(str(run), format="parquet", out=str(tmp_path / "api"))
    assert (result.rows, result.format) == (N - len(FAILED), "parquet")
    assert sorted(result.files) == ["embeddings_0.parquet", "embeddings_1.parquet", "embeddings_2.parquet",
                                    "export.json"]
    with pytest.raises(UsageError, match="--format 'npy'"):
        featshard.ExportConfig(run_dir=str(run), format="npy", out=str(tmp_path / "x"))

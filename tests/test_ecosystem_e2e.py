"""End to end through the real CLI on img2dataset-style WebDataset tars: run -> verify -> merge -> search (queries
from the tars) -> dedup --exact -> export read back by embedding-reader + autofaiss -> resume -> --retry-failed.

The tars: 00000.tar (5 samples; sample 1 is not an image), 00001.tar (4 samples; sample 0 damaged in place for the
first run, repaired before --retry-failed; sample 3 is a byte copy of 00000.tar's sample 0), 00002.tar (5 samples,
the file cut inside the last image: that row fails as truncated).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import FAST, cli, mobilenet_weights, read_all
from helpers.tars import image_bytes, make_tars, member_names, overwrite_in_place
from test_export import read_with_peers, stored

pytestmark = pytest.mark.slow
PER_TAR = [5, 4, 5]
ROWS = sum(PER_TAR)
NOT_IMAGE, DAMAGED, DUPLICATE, TRUNCATED = 1, 5, 8, 13


def _data(t: int, j: int) -> bytes:
    if (t, j) == (0, 1):
        return b"GIF? no: a caption saved under the image's name" * 4
    if (t, j) == (1, 3):
        return _data(0, 0)
    return image_bytes(t * 100 + j, "PNG" if j % 3 == 2 else "JPEG", size=(120 + 10 * j, 90 + 7 * t))


@pytest.fixture(scope="module")
def tars(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("eco")
    paths = make_tars(root / "shards", PER_TAR, data_for=_data)
    from featshard.store.inputs import iter_items, open_input

    items = list(iter_items(open_input(root / "shards")))
    with open(paths[2], "r+b") as fh:  # cut inside the last image of 00002.tar
        fh.truncate(items[TRUNCATED].path.offset + 100)
    damaged = items[DAMAGED].path
    original = paths[1].read_bytes()[damaged.offset:damaged.offset + damaged.size]
    overwrite_in_place(paths[1], damaged.offset, b"\x00" * damaged.size)  # same size, inode and mtime
    env = {"FEATSHARD_CACHE_DIR": str(root / "cache")}
    args = ["run", "--input", str(root / "shards"), "--out", str(root / "run"), "--gpus", "cpu:2",
            "--weights", mobilenet_weights(), "--chunk-size", "3", *FAST]
    proc = cli(*args, env=env, check=True)
    return {"root": root, "run": root / "run", "args": args, "env": env, "paths": paths, "damaged": damaged,
            "original": original, "stderr": proc.stderr}


def _failed(run: Path) -> dict[int, str]:
    return {int(r): why.decode() for d in read_all(run).values()
            for r, why in zip(d["failed_rows"], d["failed_reasons"])}


def test_every_sample_is_a_row_with_its_tar_name(tars: dict) -> None:
    run: Path = tars["run"]
    names = member_names(PER_TAR)
    got = {}
    for d in read_all(run).values():
        got.update(zip(d["rows"].tolist(), (n.decode() for n in d["names"])))
        got.update(zip(d["failed_rows"].tolist(), (n.decode() for n in d["failed_names"])))
    assert got == dict(enumerate(names))
    failed = _failed(run)
    assert sorted(failed) == [NOT_IMAGE, DAMAGED, TRUNCATED]
    assert failed[NOT_IMAGE].startswith("not_image:") and failed[TRUNCATED].startswith("truncated:")
    assert failed[DAMAGED].split(":")[0] in ("not_image", "corrupt")
    assert "00002.tar: the tar is truncated or damaged" in tars["stderr"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["input"]["kind"] == "tar" and manifest["rows"] == ROWS
    proc = cli("verify", str(run), env=tars["env"])
    assert proc.returncode == 0 and "every input row is accounted for exactly once" in proc.stdout, proc.stdout


def test_search_with_queries_from_the_tars_finds_each_sample_first(tars: dict) -> None:
    run: Path = tars["run"]
    cli("merge", str(run), check=True)
    proc = cli("search", str(run), "--input", str(tars["root"] / "shards"), "-k", "2", "--json", env=tars["env"])
    assert proc.returncode == 1, proc.stderr  # 1: some queries could not be read (the failed rows)
    results = json.loads(proc.stdout)
    names = member_names(PER_TAR)
    assert [r["query"] for r in results] == names
    for row, res in enumerate(results):
        if row in (NOT_IMAGE, DAMAGED, TRUNCATED):
            assert res["results"] == [] and res["error"]
            continue
        top = res["results"][0]
        expected = {0, DUPLICATE} if row in (0, DUPLICATE) else {row}  # the two copies score the same
        assert top["score"] > 0.999 and top["row"] in expected and top["name"] == names[top["row"]], res


def test_dedup_exact_hashes_the_members(tars: dict) -> None:
    run: Path = tars["run"]
    if not (run / "index" / "index.faiss").is_file():
        cli("merge", str(run), check=True)
    proc = cli("dedup", str(run), "--exact", "--json", env=tars["env"], check=True)
    exact = json.loads(proc.stdout)["exact"]
    assert [[m["name"] for m in g["members"]] for g in exact] == [["00000.tar/000000000.jpg",
                                                                  "00001.tar/000010003.jpg"]]


def test_serve_answers_images_and_thumbnails_from_the_tars(tars: dict, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`featshard serve` over the tar run: /image/<row> is the member's bytes read by offset, /thumb works, a
    failed row is not served."""
    import io

    from PIL import Image
    from helpers.server import Server

    run: Path = tars["run"]
    if not (run / "index" / "index.faiss").is_file():
        cli("merge", str(run), check=True)
    monkeypatch.setenv("FEATSHARD_CACHE_DIR", tars["env"]["FEATSHARD_CACHE_DIR"])
    srv = Server(run, log_path=tmp_path / "serve.log").start()
    try:
        for row, (t, j) in [(0, (0, 0)), (2, (0, 2)), (9, (2, 0))]:  # a JPEG, a PNG, one of the cut tar
            want = _data(t, j)
            got = srv.get(f"/image/{row}")
            ctype = "image/png" if member_names(PER_TAR)[row].endswith(".png") else "image/jpeg"
            assert got.status == 200 and got.body == want and got.headers["content-type"] == ctype, got
        thumb = srv.get("/thumb/3")
        assert thumb.status == 200 and Image.open(io.BytesIO(thumb.body)).format == "JPEG"
        assert srv.get(f"/image/{NOT_IMAGE}").status == 404
    finally:
        srv.stop()
    assert srv.stopped_cleanly(), srv.read_log()[-3000:]


def test_export_of_the_tar_run_is_read_by_embedding_reader_and_autofaiss(tars: dict, tmp_path: Path) -> None:
    run: Path = tars["run"]
    cli("export", str(run), "--format", "clip-retrieval", "--out", str(tmp_path / "exp"), check=True)
    want = stored(run)
    vectors, meta, found, info = read_with_peers(tmp_path / "exp", "clip-retrieval", tmp_path / "peers")
    assert info["count"] == info["ntotal"] == len(want) == ROWS - 3
    assert {row: name for row, name in meta} == {row: name for row, (name, _) in want.items()}
    for (row, _), vec in zip(meta, vectors):
        assert np.array_equal(want[row][1], vec)
    dup = [i for i, (row, _) in enumerate(meta) if row in (0, DUPLICATE)]
    assert all(found[i] == i or i in dup and found[i] in dup for i in range(len(meta)))


def test_resume_redoes_only_the_missing_shard(tars: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(tars["run"], out)
    shutil.rmtree(out / "index", ignore_errors=True)
    (out / "shards" / "shard-00001-of-00002.h5").unlink()
    args = [a if a != str(tars["run"]) else str(out) for a in tars["args"]]
    cli(*args, env=tars["env"], check=True)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["resumed_rows"], summary["processed_rows"]) == (ROWS // 2, ROWS - ROWS // 2)
    before, after = read_all(tars["run"]), read_all(out)
    for name, data in before.items():
        for key in ("rows", "names", "failed_rows", "failed_names"):
            assert np.array_equal(data[key], after[name][key]), (name, key)
        np.testing.assert_allclose(after[name]["features"], data["features"], atol=1e-6)


def test_retry_failed_recovers_the_repaired_member(tars: dict, tmp_path: Path) -> None:
    """The damaged member's bytes are repaired in place (the tar's size, inode and mtime unchanged: the same
    input); --retry-failed gives that row its vector and keeps the two others failed, with reasons."""
    out = tmp_path / "run"
    shutil.copytree(tars["run"], out)
    shutil.rmtree(out / "index", ignore_errors=True)
    args = [a if a != str(tars["run"]) else str(out) for a in tars["args"]]
    damaged = tars["damaged"]
    overwrite_in_place(tars["paths"][1], damaged.offset, tars["original"])
    try:
        cli(*args, "--retry-failed", env=tars["env"], check=True)
    finally:
        overwrite_in_place(tars["paths"][1], damaged.offset, b"\x00" * damaged.size)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["retried_rows"], summary["recovered_rows"]) == (3, 1)
    assert sorted(_failed(out)) == [NOT_IMAGE, TRUNCATED]
    assert DAMAGED in stored(out)
    assert cli("verify", str(out), env=tars["env"]).returncode == 0

"""End to end through the real CLI: run (pool, cpu:3) -> merge -> search, fidelity, and the backend contract."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import FAST, cli, make_images, mobilenet_weights, read_all, write_list

from featshard.store import shards

pytestmark = pytest.mark.slow  # runs the real pipeline: `make test-fast` leaves it out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("e2e")
    images = make_images(root / "imgs", 11)
    entries: list[Path | str] = [*images, "imgs/does-not-exist.jpg", images[3]]  # a missing file, a repeated path
    return write_list(root / "list.txt", entries), images


@pytest.fixture(scope="module")
def pooled_run(corpus: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    lst, _ = corpus
    out = tmp_path_factory.mktemp("run") / "run"
    cli("run", "--input", str(lst), "--out", str(out), "--gpus", "cpu:3", "--weights", mobilenet_weights(),
        "--chunk-size", "3", *FAST, check=True)
    return out


def test_every_row_lands_in_exactly_one_shard(pooled_run: Path) -> None:
    data = read_all(pooled_run)
    assert len(data) == 3
    rows = np.concatenate([d["rows"] for d in data.values()] + [d["failed_rows"] for d in data.values()])
    assert sorted(rows.tolist()) == list(range(13))
    failed = {int(r): reason for d in data.values() for r, reason in zip(d["failed_rows"], d["failed_reasons"])}
    assert list(failed) == [11] and failed[11].decode().startswith("missing")
    summary = json.loads((pooled_run / "summary.json").read_text())
    assert (summary["rows"], summary["ok"], summary["failed"], summary["complete"]) == (13, 12, 1, True)
    manifest = json.loads((pooled_run / "manifest.json").read_text())
    assert [(s["start"], s["stop"]) for s in manifest["plan"]] == [(0, 4), (4, 8), (8, 13)]
    attrs = shards.read_attrs(next((pooled_run / "shards").glob("shard-00000*.h5")))
    assert attrs["complete"] and attrs["fingerprint"] == manifest["fingerprint"] and attrs["dim"] == 1280
    assert not list((pooled_run / "shards").glob("*.parts"))


def test_merge_then_search_finds_each_image_first(pooled_run: Path, corpus: tuple[Path, list[Path]]) -> None:
    _, images = corpus
    cli("merge", str(pooled_run), check=True)
    assert (pooled_run / "index" / "index.faiss").is_file()
    args = [a for img in images[:6] for a in ("--image", str(img))]
    proc = cli("search", str(pooled_run), *args, "-k", "3", "--json", check=True)
    results = json.loads(proc.stdout)
    assert len(results) == 6
    for img, res in zip(images[:6], results):
        top = res["results"][0]
        assert top["name"] == str(img) and top["score"] > 0.999
        expected = {images.index(img), 12} if img == images[3] else {images.index(img)}  # row 12 repeats img 3
        assert {hit["row"] for hit in res["results"][:len(expected)]} == expected


def test_duplicate_path_rows_get_identical_features(pooled_run: Path) -> None:
    data = read_all(pooled_run)
    feats = {int(r): f for d in data.values() for r, f in zip(d["rows"], d["features"])}
    np.testing.assert_allclose(feats[3], feats[12], atol=1e-5)


def test_stored_fp32_features_match_direct_torchvision(tmp_path: Path) -> None:
    import torch
    import torchvision
    from PIL import Image
    from torchvision.models.feature_extraction import create_feature_extractor

    images = make_images(tmp_path / "imgs", 5, seed=7)
    out = tmp_path / "run"
    weights = mobilenet_weights()
    cli("run", "--input", str(write_list(tmp_path / "l.txt", images)), "--out", str(out), "--gpus", "cpu",
        "--weights", weights, "--decode", "exact", *FAST, check=True)
    stored = read_all(out)["shard-00000-of-00001.h5"]["features"]
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(weights, weights_only=True))
    net = create_feature_extractor(model.eval(), {"classifier.0": "f"})
    tf = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    with torch.inference_mode():
        batch = torch.stack([tf(Image.open(p).convert("RGB")) for p in images])
        ref = torch.nn.functional.normalize(net(batch)["f"], dim=1).numpy()
    cos = (stored * ref).sum(1)
    assert cos.mean() >= 0.999 and cos.min() >= 0.998, cos


def test_inline_and_pool_backends_give_identical_shards(corpus: tuple[Path, list[Path]], tmp_path: Path) -> None:
    lst, _ = corpus
    common = ["--input", str(lst), "--gpus", "cpu:2", "--weights", "none", "--chunk-size", "4", *FAST]
    cli("run", "--out", str(tmp_path / "inline"), "--backend", "inline", *common, check=True)
    cli("run", "--out", str(tmp_path / "pool"), "--backend", "pool", *common, check=True)
    a, b = read_all(tmp_path / "inline"), read_all(tmp_path / "pool")
    assert a.keys() == b.keys()
    for name in a:
        for key in shards.DATASETS:
            if key == "features":
                np.testing.assert_allclose(a[name][key], b[name][key], rtol=0, atol=1e-6)
            else:
                assert a[name][key].tolist() == b[name][key].tolist(), (name, key)


def test_graph_choice_is_recorded_and_keeps_the_vectors(corpus: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """`--graph auto` (the default) and `jit` give the eager vectors; summary.json says what each worker ran."""
    lst, _ = corpus
    base = [a for a in FAST if a not in ("--graph", "eager")]
    common = ["--input", str(lst), "--gpus", "cpu:1", "--weights", "none", *base]
    outs = {}
    for graph in ("eager", "auto", "jit"):
        outs[graph] = tmp_path / graph
        args = ["--graph", graph] if graph != "auto" else []
        cli("run", "--out", str(outs[graph]), *common, *args, check=True)
        summary = json.loads((outs[graph] / "summary.json").read_text())
        assert summary["graphs"] == ([graph] if graph != "auto" else summary["graphs"])
        assert summary["graphs"][0] in ("eager", "jit") and summary["shards"][0]["graph"] == summary["graphs"][0]
        assert "wait_first" in summary["stages"]
    ref = read_all(outs["eager"])
    for graph in ("auto", "jit"):
        other = read_all(outs[graph])
        for name in ref:
            np.testing.assert_allclose(other[name]["features"], ref[name]["features"], rtol=0, atol=1e-5)


def test_jit_below_fp32_is_refused_before_any_work(corpus: tuple[Path, list[Path]], tmp_path: Path) -> None:
    lst, _ = corpus
    res = cli("run", "--input", str(lst), "--out", str(tmp_path / "r"), "--weights", "none", "--graph", "jit",
              "--precision", "bf16")
    assert res.returncode == 2 and "fp32 only" in res.stderr
    assert not (tmp_path / "r" / "manifest.json").exists()

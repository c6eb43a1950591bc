"""The demo: data-set builder (photos from pip packages + edited variants), weights verification, and one reduced
end-to-end `featshard demo` run through the real CLI."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featshard.index.search import Hit, QueryResult
from featshard.tools import demo
from featshard.errors import FeatshardError, UsageError


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("demo-set")
    return out, demo.build_demo_set(out, limit=2)


def test_sources_are_photos_from_both_packages() -> None:
    sources = demo.source_photos()
    names = [name for name, _ in sources]
    assert names[:2] == ["chelsea", "coffee"]
    assert len(names) == len(set(names)), "demo names must be unique"
    assert all(path.is_file() for _, path in sources)
    assert len(sources) == len(demo.SKIMAGE_PHOTOS) + 20  # 13 skimage photos + foolbox's 20 ImageNet JPEGs
    # foolbox files are named by their ImageNet label; the two jeeps are told apart
    assert {"dalmatian", "jeep", "jeep-2", "bull-mastiff"} <= set(names)
    assert all("__" not in name for name in names)


def test_list_lines_resolve_to_images(demo_set: tuple[Path, list[str]]) -> None:
    out, lines = demo_set
    listed = [line for line in (out / "list.txt").read_text().splitlines() if line]
    assert listed == lines
    assert len(lines) == 2 * (1 + len(demo.VARIANTS))
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(line).name for line in lines)
    for line in lines:
        path = out / line  # relative to the list file's folder
        with Image.open(path) as im:
            im.verify()
    assert "images/chelsea.png" in lines and "images/coffee__jpeg-q10.jpg" in lines


def test_source_is_the_shipped_file(demo_set: tuple[Path, list[str]]) -> None:
    out, _ = demo_set
    shipped = dict(demo.source_photos())["chelsea"]
    assert (out / "images" / "chelsea.png").read_bytes() == shipped.read_bytes()


def test_variants_are_real_edits_of_the_source(demo_set: tuple[Path, list[str]]) -> None:
    images = demo_set[0] / "images"
    src = _rgb(images / "coffee.png")
    h, w = src.shape[:2]

    crop = _rgb(images / "coffee__crop.jpg")
    box = src[int(h * 0.05):int(h * 0.75), int(w * 0.10):int(w * 0.80)]
    assert crop.shape == box.shape and crop.shape[0] < h
    assert np.abs(crop - box).mean() < 4

    flip = _rgb(images / "coffee__flip.jpg")
    assert np.abs(flip - src[:, ::-1]).mean() < 4
    assert np.abs(flip - src).mean() > 20  # not a copy: the photo is not symmetric

    colour = _rgb(images / "coffee__colour.jpg")
    assert colour.shape == src.shape
    assert colour[..., 0].mean() > src[..., 0].mean() + 10 and colour[..., 2].mean() < src[..., 2].mean() - 10
    gray_src, gray_col = src.mean(axis=2).ravel(), colour.mean(axis=2).ravel()
    assert np.corrcoef(gray_src, gray_col)[0, 1] > 0.9  # same picture, other colours

    low = images / "coffee__jpeg-q10.jpg"
    lowq = _rgb(low)
    assert lowq.shape == src.shape
    assert 0.5 < np.abs(lowq - src).mean() < 12
    assert low.stat().st_size < (images / "coffee__flip.jpg").stat().st_size / 2


def test_rebuild_replaces_the_images(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "stale.jpg").write_bytes(b"old")
    lines = demo.build_demo_set(tmp_path, limit=1)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(Path(x).name for x in lines)


def test_weights_file_is_the_verified_torchvision_file() -> None:
    path = demo.weights_file()
    assert path.name == "mobilenet_v2-b0353104.pth"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == demo.WEIGHTS_SHA256
    assert demo.WEIGHTS_SHA256.startswith("b0353104")


def test_weights_sha256_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "mobilenet_v2-b0353104.pth"
    fake.write_bytes(b"not the weights")
    actual = hashlib.sha256(b"not the weights").hexdigest()
    with pytest.raises(FeatshardError, match="sha256") as info:
        demo.verify_weights(fake)
    assert actual in str(info.value) and demo.WEIGHTS_SHA256 in str(info.value)
    assert demo.verify_weights(fake, expected=actual) == fake
    with pytest.raises(FeatshardError, match="does not exist"):
        demo.verify_weights(tmp_path / "missing.pth")


def test_out_folder_not_made_by_demo_is_refused(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not made by"):
        demo._prepare_out(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        demo._prepare_out(tmp_path / "file")


def test_out_folder_of_an_earlier_demo_is_reused(tmp_path: Path) -> None:
    demo._prepare_out(tmp_path)
    (tmp_path / "run" / "shards").mkdir(parents=True)
    (tmp_path / "images").mkdir()
    demo._prepare_out(tmp_path)  # a second `make demo` starts the run afresh
    assert (tmp_path / demo.MARKER).is_file() and not (tmp_path / "run").exists()
    demo._prepare_out(tmp_path / "new" / "deeper")
    assert (tmp_path / "new" / "deeper" / demo.MARKER).is_file()


def test_default_queries_and_table() -> None:
    lines = ["images/a.png", "images/a__crop.jpg", "images/b.jpg", "images/b__colour.jpg"]
    assert demo.default_queries(lines) == ["a__crop.jpg", "b__colour.jpg"]
    table = demo.format_results([QueryResult("x/a__crop.jpg", [Hit("images/a__crop.jpg", 1, 1.0, 1, "run"),
                                                               Hit("images/a.png", 0, 0.8123, 0, "run")])])
    assert "query: a__crop.jpg" in table and "(the query itself)" in table
    assert "2. a.png" in table and "0.812" in table


def _group(name: str) -> str:
    return Path(name).name.split("__")[0].rsplit(".", 1)[0]


@pytest.mark.slow
def test_demo_end_to_end_reduced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from featshard.cli import main

    out = tmp_path / "demo-out"
    assert main(["demo", "--out", str(out), "--limit", "3", "--gpus", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "query: chelsea__crop.jpg" in printed and "query: astronaut__colour.jpg" in printed
    assert "demo: 15 images (15 ok, 0 failed)" in printed
    assert (out / "run" / "index" / "index.faiss").is_file()

    variants = [line for line in (out / "list.txt").read_text().split() if "__" in line]
    argv = ["search", str(out / "run"), "-k", "2", "--json"]
    for line in variants:
        argv += ["--image", str(out / line)]
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == len(variants)
    for entry in results:
        query = Path(entry["query"]).name
        others = [hit["name"] for hit in entry["results"] if Path(hit["name"]).name != query]
        assert _group(others[0]) == _group(query), (query, entry["results"])

    assert main(["demo", "--out", str(out), "--limit", "0"]) == 2

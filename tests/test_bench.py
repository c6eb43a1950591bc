"""`featshard bench` runs end to end at a tiny size; every fast path keeps its fidelity floor; the bench set's mix."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import cli, mobilenet_weights
from PIL import Image

from featshard.tools import benchdata
from featshard.tools.benchfidelity import FLOORS, below_floor, cosine_stats, decode_agreement, fidelity
from featshard.extract.decode import load_image
from featshard.extract.models import cpu_has_bf16, preprocess_for


def test_plan_has_the_size_mix_and_some_png() -> None:
    plan = benchdata._plan(40, seed=3)
    area = [w * h for w, h, _ in plan]
    assert sum(a < 300_000 for a in area) == 16  # ~500x375 (+-10%, some portrait)
    assert sum(a == 640_000 for a in area) == 16  # 800x800
    assert sum(a == 3_000_000 for a in area) == 8  # 2000x1500 / 1500x2000
    pngs = [(w, h) for w, h, fmt in plan if fmt == "PNG"]
    assert 1 <= len(pngs) <= 3 and all(w * h < 1_000_000 for w, h in pngs)


def test_set_is_photo_like_decodable_and_reused(tmp_path: Path) -> None:
    lst = benchdata.build_set(tmp_path / "data", 6, seed=1)
    lines = lst.read_text().splitlines()
    assert len(lines) == 6
    prep = preprocess_for("mobilenet_v2", "none")
    for line in lines:
        with Image.open(tmp_path / "data" / line) as im:
            arr = np.asarray(im.convert("RGB"), np.float32)
        assert arr.std() > 20 and np.abs(np.diff(arr, axis=1)).mean() > 2  # not flat, has edges and texture
        assert load_image(str(tmp_path / "data" / line), prep).shape == (224, 224, 3)
    stamp = (tmp_path / "data" / "list.txt").stat().st_mtime_ns
    assert benchdata.build_set(tmp_path / "data", 6, seed=1) == lst
    assert (tmp_path / "data" / "list.txt").stat().st_mtime_ns == stamp


def test_cosine_stats() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[1.0, 0.0], [1.0, 1.0]])
    stats = cosine_stats(a, b)
    assert stats["n"] == 2 and stats["min"] == pytest.approx(2 ** -0.5, abs=1e-6)
    assert stats["mean"] == pytest.approx((1 + 2 ** -0.5) / 2, abs=1e-6)


@pytest.mark.slow
def test_fast_paths_keep_fidelity_on_trained_weights(tmp_path: Path) -> None:
    """Draft decode, bf16 (where the CPU has it) and the device-decode code path against exact decode + fp32."""
    mobilenet_weights()  # skips without the offline weights: random-init fidelity means nothing
    photos = benchdata.base_photos()
    sizes = [(2000, 1500), (1500, 2000), (1600, 1200), (1200, 900), (800, 800), (640, 480)]
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = tmp_path / f"{i}.jpg"
        benchdata.make_image(100 + i, w, h, photos).save(path, "JPEG", quality=90)
        paths.append(str(path))
    precision = "bf16" if cpu_has_bf16() else "fp32"
    res = fidelity("mobilenet_v2", preprocess_for("mobilenet_v2", "none"), paths, "cpu", precision, compile=False)
    assert res["weights"] == "imagenet"
    assert res["decode_fast"]["mean"] >= FLOORS["decode_fast"]
    assert res["decode_device"]["mean"] >= FLOORS["decode_device"]
    if precision == "bf16":
        assert res["bf16"]["mean"] >= FLOORS["bf16"]
    assert below_floor(res) == []


@pytest.mark.slow
def test_quick_bench_writes_json_and_chart(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = cli("bench", "--quick", "--out", str(out), "--images", "8", "--fidelity-images", "4", timeout=900,
               check=True)
    assert "featshard run" in proc.stdout and "seed loop" in proc.stdout
    result = json.loads((out / "bench.json").read_text())
    assert {"machine", "settings", "models", "fidelity", "bench_peak_rss_mb"} <= set(result)
    m = result["models"]["mobilenet_v2"]
    prec = m["precision"]
    assert {"decode_exact", "decode_fast", "model_fp32", f"model_{prec}", "run", "seed_loop",
            "plain_loader"} <= set(m["rows"])
    run = m["rows"]["run"]
    assert run["images"] == 8 and run["ok"] == 8 and run["median"] > 0 and run["steady_median"] > 0
    assert run["peak_pss_tree_mb"] > 0 and run["peak_rss_coordinator_mb"] > 0
    assert set(run["stages"]) >= {"load_model", "wait_data", "decode", "h2d", "model", "write", "loop"}
    assert 0 < run["model_busy"] <= 1 and run["steady_median"] <= run["images"] / run["stages"]["model"]
    r = m["ratios"]["run"]
    assert r["stage_bound"] > 0 and r["vs_seed_loop"] > 0 and r["targets"]["seed"] == 3.0
    assert {"decode_fast", "decode_device"} <= set(result["fidelity"])
    assert result["fidelity"]["decode_device"]["same_outcome"] and result["fidelity"]["decode_device"]["failed"] == 3
    with Image.open(out / "bench.png") as im:
        assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 200


@pytest.mark.slow
def test_device_decode_agrees_with_exact_on_the_bad_input_corpus(tmp_path: Path) -> None:
    """`--decode gpu` (its code on the CPU) against `--decode exact` on every entry of the bad-input corpus plus the
    odd JPEGs (progressive, CMYK, Adobe RGB, ICC, 4:4:4, 4:2:2, three broken): the same rows fail (same reason
    class), and every image that decodes has cosine >= 0.995 with exact (trained weights)."""
    from helpers import make_corpus

    weights = mobilenet_weights()
    entries = make_corpus(tmp_path / "corpus")
    paths = [str(tmp_path / "corpus" / name) for name, _ in entries]
    paths += [str(p) for p in benchdata.odd_jpegs(tmp_path / "odd")]
    res = decode_agreement("mobilenet_v2", weights, preprocess_for("mobilenet_v2", "none"), paths, "cpu")
    assert res["same_outcome"], res["mismatched"]
    assert res["failed"] == sum(reason is not None for _, reason in entries) + 3
    assert res["n"] == len(paths) - res["failed"] and res["min"] >= FLOORS["decode_device"], res

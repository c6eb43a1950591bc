"""Extractor: default layers, pooling of maps and tokens, on-device normalisation, empty batches, gpu fallback."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision

from featshard.extract import extractor as extractor_module
from featshard.errors import UsageError
from featshard.extract.extractor import Extractor
from featshard.extract.head import pool_features, resolve_layer
from featshard.extract.models import ModelSpec, preprocess_for

PREP = preprocess_for("mobilenet_v2", "none")


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def mobilenet() -> Extractor:
    return Extractor(ModelSpec("mobilenet_v2", "none", precision="fp32"), PREP, "cpu")


@pytest.mark.parametrize("name, layer", [("mobilenet_v2", "classifier.0"), ("resnet18", "flatten"),
                                         ("vit_b_16", "getitem_5")])
def test_default_layer_is_the_classifier_input(name: str, layer: str) -> None:
    assert resolve_layer(torchvision.models.get_model(name, weights=None), None) == layer


def test_unknown_layer_lists_the_last_nodes() -> None:
    with pytest.raises(UsageError, match="flatten"):
        resolve_layer(torchvision.models.get_model("resnet18", weights=None), "nope")


def test_pooling_of_maps_and_tokens() -> None:
    maps = torch.rand(2, 5, 3, 4) + 0.1
    flat = maps.flatten(2).numpy()
    assert np.allclose(pool_features(maps, "avg").numpy(), flat.mean(2), atol=1e-6)
    assert np.allclose(pool_features(maps, "max").numpy(), flat.max(2))
    assert np.allclose(pool_features(maps, "gem").numpy(), np.cbrt((flat ** 3).mean(2)), atol=1e-5)
    tokens = torch.rand(2, 6, 8)  # N, L, C: pooled over the tokens
    assert pool_features(tokens, "avg").shape == (2, 8)
    assert np.allclose(pool_features(tokens, "max").numpy(), tokens.numpy().max(1))
    vec = torch.rand(3, 7)
    assert pool_features(vec, "gem") is vec
    with pytest.raises(UsageError):
        pool_features(maps, "median")


def test_normalisation_happens_on_the_device_in_channels_last(mobilenet: Extractor) -> None:
    x = pixels(2)
    got = mobilenet.to_device(torch.from_numpy(x))
    mean, std = np.array(PREP.mean), np.array(PREP.std)
    want = ((x / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    assert got.shape == (2, 3, 224, 224) and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert np.allclose(got.numpy(), want, atol=1e-5)


def test_features_are_unit_vectors_of_the_layer_dim(mobilenet: Extractor) -> None:
    feats = mobilenet(pixels(3))
    assert feats.shape == (3, 1280) and mobilenet.dim == 1280 and feats.dtype == np.float32
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(feats[0], feats[1])


def test_pooling_a_spatial_layer(mobilenet: Extractor) -> None:
    """Average-pooling MobileNetV2's last feature map is what its classifier input is; max and gem differ."""
    x = pixels(2, seed=1)
    by_pool = {pool: Extractor(ModelSpec("mobilenet_v2", "none", layer="features.18", pool=pool, precision="fp32"),
                               PREP, "cpu")(x) for pool in ("avg", "max", "gem")}
    assert np.allclose(by_pool["avg"], mobilenet(x), atol=1e-4)
    assert not np.allclose(by_pool["max"], by_pool["avg"], atol=1e-3)
    assert not np.allclose(by_pool["gem"], by_pool["avg"], atol=1e-3)


def test_unnormalised_vectors_keep_their_length() -> None:
    ext = Extractor(ModelSpec("resnet18", "none", normalize=False, precision="fp32"), PREP, "cpu")
    feats = ext(pixels(2))
    assert feats.shape == (2, 512) and not np.allclose(np.linalg.norm(feats, axis=1), 1.0)


def test_an_empty_batch_gives_no_rows(mobilenet: Extractor) -> None:
    out = mobilenet.forward_device(torch.zeros((0, 3, 224, 224)))
    assert tuple(out.shape) == (0, 1280)


def test_gpu_decode_on_cpu_falls_back_and_says_so_once(caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extractor_module, "_warned_gpu_decode", False)
    prep = replace(PREP, decode="gpu")
    with caplog.at_level(logging.WARNING, logger="featshard.extract.extractor"):
        first = Extractor(ModelSpec("mobilenet_v2", "none", precision="fp32"), prep, "cpu")
        Extractor(ModelSpec("mobilenet_v2", "none", precision="fp32"), prep, "cpu")
    assert not first.device_decode
    assert sum("--decode gpu needs a CUDA device" in r.getMessage() for r in caplog.records) == 1


def test_batch_to_device_releases_pixels_and_decodes_jpeg_bytes(tmp_path: Path, mobilenet: Extractor) -> None:
    """The worker's hook: a plain batch and a device-decode batch (run here with the CPU as the device) give the
    same features; either way the batch keeps its rows but no longer its pixels."""
    from helpers import make_images

    from featshard.store.inputs import Item
    from featshard.extract.loader import make_loader

    paths = make_images(tmp_path, 4)
    items = [[Item(i, p.name, str(p)) for i, p in enumerate(paths)]]
    (plain,) = list(make_loader(items, PREP, 0, pin=False))
    (raw,) = list(make_loader(items, replace(PREP, decode="gpu"), 0, pin=False, device_decode=True))
    assert raw.encoded is not None and raw.pixels.shape[0] == 2  # JPEG bytes for 2, pixels for the 2 PNGs
    a = mobilenet.forward_device(mobilenet.batch_to_device(plain)).numpy()
    b = mobilenet.forward_device(mobilenet.batch_to_device(raw)).numpy()
    assert a.shape == b.shape == (4, 1280) and (a * b).sum(1).min() > 0.99
    for batch in (plain, raw):
        assert batch.rows == [0, 1, 2, 3] and batch.pixels.numel() == 0 and batch.encoded is None


def test_tune_process_env_only_fills_what_the_user_left_unset() -> None:
    from featshard.runner.runtime import RUNTIME_ENV, tune_process_env

    env: dict[str, str] = {}
    assert tune_process_env(env) == RUNTIME_ENV and env == RUNTIME_ENV
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert tune_process_env(mine) == {} and mine == {"OMP_WAIT_POLICY": "ACTIVE"}


def loader_batch(n: int, seed: int = 0) -> Any:
    from featshard.extract.batch import Batch

    return Batch(list(range(n)), [f"r{i}" for i in range(n)], torch.from_numpy(pixels(n, seed)), [], [], [])


def test_submit_then_result_is_the_extraction_step_and_books_device_time(mobilenet: Extractor) -> None:
    want = mobilenet(pixels(3, seed=2))
    stages: dict[str, float] = {}
    first = mobilenet.submit(loader_batch(3, seed=2), stages)
    second = mobilenet.submit(loader_batch(2, seed=3), stages)  # a second batch queued before the first is taken
    assert first.ready() and not stages  # a CPU computes at once; stages are booked when a result is taken
    np.testing.assert_allclose(first.result(), want, atol=1e-5)
    assert set(stages) == {"h2d", "model"} and stages["model"] > 0
    assert second.result().shape == (2, 1280)
    empty = loader_batch(0)
    assert mobilenet.submit(empty, stages).result().shape == (0, 1280)


class OutOfMemoryAbove(torch.nn.Module):
    """The real network on a device that holds `limit` images: larger inputs raise the error CUDA raises."""

    def __init__(self, net: Any, limit: int) -> None:
        super().__init__()
        self.net, self.limit, self.sizes = net, limit, []

    def forward(self, x: Any) -> Any:
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated device of 8 images)")
        return self.net(x)


def test_out_of_memory_halves_the_model_batch_and_keeps_every_row(caplog: pytest.LogCaptureFixture) -> None:
    ext = Extractor(ModelSpec("mobilenet_v2", "none", precision="fp32", graph="eager"), PREP, "cpu", batch_size=32)
    want = ext(pixels(20, seed=4))
    ext.net = OutOfMemoryAbove(ext.net, 8)
    with caplog.at_level(logging.WARNING, logger="featshard.extract.extractor"):
        got = ext.features(loader_batch(20, seed=4))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert ext.batch_size_used == 8 and ext.net.sizes == [20, 16, 8, 8, 4]
    assert sum("running batches of" in r.getMessage() for r in caplog.records) == 2
    ext.net.limit = 0
    with pytest.raises(torch.cuda.OutOfMemoryError):  # nothing fits: the error goes up, nothing is recorded
        ext.features(loader_batch(1))


@pytest.mark.gpu
def test_real_cuda_out_of_memory_halves_the_batch() -> None:
    """A GPU limited to a small share of its memory: ResNet-50 at batch 1024 does not fit, a halved batch does."""
    torch.cuda.set_per_process_memory_fraction(0.04)
    try:
        ext = Extractor(ModelSpec("resnet50", "none", precision="fp32", graph="eager"), preprocess_for("resnet50",
                        "none"), "cuda:0", batch_size=1024)
        assert ext.batch_size_used < 1024
        feats = ext.features(loader_batch(300))
        assert feats.shape == (300, 2048) and np.isfinite(feats).all()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


@pytest.mark.gpu
def test_gpu_batches_are_padded_to_one_shape_and_copied_back_asynchronously() -> None:
    ext = Extractor(ModelSpec("mobilenet_v2", "none", precision="bf16"), PREP, "cuda:0", batch_size=16)
    assert torch.backends.cudnn.benchmark and ext.fixed_shape
    stages: dict[str, float] = {}
    pending = ext.submit(loader_batch(5), stages)
    feats = pending.result()
    assert feats.shape == (5, 1280) and stages["model"] > 0 and "h2d" in stages
    np.testing.assert_allclose(feats, ext(pixels(5)), atol=2e-2)

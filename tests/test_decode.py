"""featshard.extract.decode: every corpus entry ends as a crop or a classified failure; exact == torchvision;
fast ~ exact."""
from __future__ import annotations

import os
import pickle
import signal
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

import featshard.extract.decode as decode
import featshard.extract.resizecrop as resizecrop
from helpers import cmyk_array, corpus_names, make_corpus, textured
from featshard.extract.decode import REASONS, ImageFailure, load_image
from featshard.extract.preprocess import Preprocess

# decode refuses those images itself; Pillow's warning for them is silenced by decode, but pytest re-enables it
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
T = Image.Transpose
SHOWN_FROM_STORED_INVERSE = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE,
                             6: T.ROTATE_90, 7: T.TRANSVERSE, 8: T.ROTATE_270}  # stored = shown.transpose(this)


def prep(decode: str = "fast", resize: int = 256, crop: int = 224, interpolation: str = "bilinear",
         **kw: object) -> Preprocess:
    return Preprocess(resize, crop, interpolation, True, MEAN, STD, decode=decode, **kw)  # type: ignore[arg-type]


def reference(img: Image.Image, resize: int = 256, crop: int = 224, interpolation: str = "bilinear") -> np.ndarray:
    """torchvision's ImageClassification geometry on a PIL RGB image."""
    out = F.center_crop(F.resize(img, [resize], interpolation=InterpolationMode(interpolation)), [crop])
    return np.asarray(out)


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = [((v / 255.0 - np.array(MEAN)) / np.array(STD)).ravel() for v in (a, b)]
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    folder = tmp_path_factory.mktemp("corpus")
    return folder, dict(make_corpus(folder))


def test_corpus_names_and_reasons(corpus: tuple[Path, dict[str, str | None]]) -> None:
    _, expected = corpus
    assert list(expected) == corpus_names()
    assert {r for r in expected.values() if r} <= set(REASONS)
    wanted = set(REASONS) - {"timeout", "error", "permission"}  # permission: only when not root (see helpers/corpus.py)
    assert wanted <= set(expected.values())


@pytest.mark.parametrize("mode", ["fast", "exact"])
@pytest.mark.parametrize("name", corpus_names())
def test_corpus_entry(corpus: tuple[Path, dict[str, str | None]], name: str, mode: str) -> None:
    folder, expected = corpus
    if expected[name] is None:
        out = load_image(str(folder / name), prep(mode))
        assert out.dtype == np.uint8 and out.shape == (224, 224, 3)
        assert out.flags.c_contiguous and out.flags.writeable
    else:
        with pytest.raises(ImageFailure) as info:
            load_image(str(folder / name), prep(mode, timeout=5.0))
        assert info.value.reason == expected[name], str(info.value)
        assert str(info.value).startswith(f"{expected[name]}: ") and info.value.message


EXACT_IMAGES = [((640, 480), "RGB", "JPEG"), ((333, 500), "RGB", "PNG"), ((256, 256), "RGB", "PNG"),
                ((1000, 120), "L", "PNG"), ((120, 1000), "RGB", "WEBP"), ((200, 150), "CMYK", "JPEG"),
                ((300, 220), "P", "GIF"), ((1200, 900), "RGB", "JPEG"), ((20, 2000), "RGB", "PNG")]
GEOMETRIES = [(256, 224, "bilinear"), (232, 224, "bilinear"), (342, 299, "bicubic"), (224, 240, "bilinear"),
              (256, 224, "nearest")]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "-".join(map(str, g)))
@pytest.mark.parametrize("size,mode,fmt", EXACT_IMAGES, ids=lambda v: str(v).replace(" ", ""))
def test_exact_is_bit_identical_to_torchvision(tmp_path: Path, size: tuple[int, int], mode: str, fmt: str,
                                               geometry: tuple[int, int, str]) -> None:
    path = tmp_path / f"image.{fmt.lower()}"
    Image.fromarray(textured(*size, seed=size[0])).convert(mode).save(path, fmt)
    with Image.open(path) as im:
        expected = reference(ImageOps.exif_transpose(im).convert("RGB"), *geometry)
    np.testing.assert_array_equal(load_image(str(path), prep("exact", *geometry)), expected)


def test_exact_beyond_256_to_1_resamples_only_the_crop(tmp_path: Path) -> None:
    """1x5000-like aspect: torchvision would materialise a huge image; decode stays within a level or two."""
    path = tmp_path / "thin.png"
    Image.fromarray(textured(4, 2000, seed=3)).save(path)
    p = prep("exact", 64, 56)
    assert 64 * 32000 > resizecrop._EXACT_MAX_AREA * 64**2  # really on the crop-only path
    out = load_image(str(path), p).astype(int)
    assert np.abs(out - reference(Image.open(path).convert("RGB"), 64, 56)).max() <= 2


def _real_photos() -> list[Image.Image]:
    skdata = pytest.importorskip("skimage.data")
    return [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]


@pytest.mark.parametrize("scale", [1, 2])
def test_fast_is_close_to_exact(tmp_path: Path, scale: int) -> None:
    """Real photos (skimage) and a synthetic one, as JPEG q90, at 1x and 2x their size: draft + box resize vs exact."""
    images = [Image.fromarray(a) for a in _real_photos()] + [Image.fromarray(textured(700, 500, seed=1))]
    diffs, cosines = [], []
    for i, im in enumerate(images):
        path = tmp_path / f"{i}.jpg"
        im.resize((im.width * scale, im.height * scale), Image.Resampling.LANCZOS).save(path, quality=90)
        for geometry in [(256, 224, "bilinear"), (232, 224, "bicubic")]:
            exact, fast = (load_image(str(path), prep(m, *geometry)) for m in ("exact", "fast"))
            diffs.append(mad(exact, fast))
            cosines.append(cosine(exact, fast))
    assert max(diffs) < 1.5 and np.mean(cosines) > 0.9995, (diffs, cosines)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("size", [(520, 390), (1024, 768), (1300, 975), (2049, 1537), (4000, 3000), (3000, 700)])
def test_fast_draft_never_upscales(tmp_path: Path, size: tuple[int, int], orientation: int) -> None:
    path = tmp_path / "flat.jpg"
    Image.new("RGB", size, (120, 130, 140)).save(path)
    shown = size[::-1] if orientation in (5, 6, 7, 8) else size
    target = F._compute_resized_output_size(shown[::-1], [256])[::-1]  # torchvision's own (w, h) after resize
    with Image.open(path) as im:
        scale = resizecrop._draft(im, tuple(target), orientation)
        drafted = im.size[::-1] if orientation in (5, 6, 7, 8) else im.size
    assert drafted[0] >= target[0] and drafted[1] >= target[1]
    assert (scale > 1) == (min(size) >= 2 * 1.25 * 256)  # draft is used whenever it can be


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_exactly(tmp_path: Path, orientation: int) -> None:
    shown = Image.fromarray(textured(400, 300, seed=orientation))
    shown.paste((255, 0, 0), (0, 0, 120, 60))  # a red block top-left makes every transposition distinct
    stored = shown.transpose(SHOWN_FROM_STORED_INVERSE[orientation]) if orientation > 1 else shown
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rot.png"
    stored.save(path, exif=exif)
    with Image.open(path) as im:  # the test's table agrees with Pillow's
        np.testing.assert_array_equal(np.asarray(ImageOps.exif_transpose(im)), np.asarray(shown))
    np.testing.assert_array_equal(load_image(str(path), prep("exact")), reference(shown))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_with_jpeg_draft(tmp_path: Path, orientation: int) -> None:
    shown = Image.fromarray(textured(1300, 975, seed=50 + orientation))
    shown.paste((255, 0, 0), (250, 160, 650, 400))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rot.jpg"
    shown.transpose(SHOWN_FROM_STORED_INVERSE[orientation]).save(path, exif=exif, quality=95)
    out = load_image(str(path), prep("fast"))
    right = mad(out, reference(shown))
    wrong = [mad(out, reference(shown.transpose(t))) for t in T if reference(shown.transpose(t)).shape == out.shape]
    assert right < 2.0 and right * 5 < min(wrong), (right, wrong)


def test_16bit_png_keeps_its_dynamic_range(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 512), (384, 1)).astype(np.uint16)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    out = load_image(str(path), prep("exact"))
    expected = reference(Image.fromarray(np.rint(ramp / 257).astype(np.uint8)).convert("RGB"))
    assert np.abs(out.astype(int) - expected).max() <= 1
    assert out[..., 0].min() < 50 and out[..., 0].max() > 205 and (out == 255).mean() < 0.01


@pytest.mark.parametrize("kind", ["I", "F"])
def test_32bit_integer_and_float_images(tmp_path: Path, kind: str) -> None:
    ramp = np.tile(np.linspace(0, 1, 512), (384, 1))
    data = (ramp * 65535).astype(np.int32) if kind == "I" else ramp.astype(np.float32)
    path = tmp_path / "ramp.tiff"
    Image.fromarray(data).save(path)
    out = load_image(str(path), prep("exact"))
    assert out[..., 0].min() < 50 and out[..., 0].max() > 205 and np.all(out[..., 0] == out[..., 2])


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    rgb = textured(256, 256, seed=4)
    alpha = np.tile(np.linspace(0, 255, 256).astype(np.uint8), (256, 1))
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    out = load_image(str(tmp_path / "rgba.png"), prep("exact")).astype(float)
    a = alpha[16:240, 16:240, None] / 255.0
    np.testing.assert_allclose(out, rgb[16:240, 16:240] * a + 255 * (1 - a), atol=1)
    pal = Image.new("P", (256, 256), 0)
    pal.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    pal.paste(1, (128, 0, 256, 256))
    pal.save(tmp_path / "p.png", transparency=0)
    out = load_image(str(tmp_path / "p.png"), prep("exact"))
    assert np.all(out[:, :100] == 255) and np.all(out[:, 130:] == (200, 30, 30))


def test_cmyk_and_ycck_jpegs_have_the_right_colours(corpus: tuple[Path, dict[str, str | None]]) -> None:
    folder, _ = corpus
    expected = reference(Image.fromarray(cmyk_array(), "CMYK").convert("RGB"))
    assert Image.open(folder / "ycck.jpg").info["adobe_transform"] == 2  # really YCCK
    for name in ("cmyk.jpg", "ycck.jpg"):
        out = load_image(str(folder / name), prep("exact"))
        assert mad(out, expected) < 3 < 50 < mad(out, 255 - expected), name  # Adobe inversion handled


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_give_their_first_frame(tmp_path: Path, fmt: str) -> None:
    frames = [np.clip(textured(200, 150, seed=9).astype(int) // 3 + np.array(tint), 0, 255).astype(np.uint8)
              for tint in [(170, 0, 0), (0, 170, 0), (0, 0, 170)]]
    path = tmp_path / f"anim.{fmt.lower()}"
    first, *rest = [Image.fromarray(f) for f in frames]
    first.save(path, fmt, save_all=True, append_images=rest, duration=100)
    out = load_image(str(path), prep("exact"))
    diffs = [mad(out, reference(Image.fromarray(f))) for f in frames]
    assert diffs[0] < 10 < min(diffs[1:]), diffs


def test_max_pixels_refuses_from_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    path = tmp_path / "big.jpg"
    Image.fromarray(textured(640, 480)).save(path)
    for limit in (100_000, 640 * 480 - 1):  # Pillow's DecompressionBombError path, then its warning path
        with pytest.raises(ImageFailure) as info:
            load_image(str(path), prep(max_pixels=limit))
        assert info.value.reason == "too_large" and Image.MAX_IMAGE_PIXELS == limit
    assert load_image(str(path), prep(max_pixels=640 * 480)).shape == (224, 224, 3)


def test_fifo_socket_and_device_are_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock.jpg"))
    try:
        for path in (tmp_path / "pipe.jpg", tmp_path / "sock.jpg", Path("/dev/null")):
            with pytest.raises(ImageFailure) as info:
                load_image(str(path), prep(timeout=2.0))
            assert info.value.reason in ("timeout", "not_regular_file"), str(info.value)
    finally:
        sock.close()


def test_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "secret.jpg"
    Image.fromarray(textured(64, 64)).save(path)
    path.chmod(0)
    euid = os.geteuid()
    if euid == 0:
        os.seteuid(65534)  # root reads mode-000 files: act as nobody for the open
    try:
        with pytest.raises(ImageFailure) as info:
            load_image(str(path), prep())
    finally:
        if euid == 0:
            os.seteuid(0)
    assert info.value.reason == "permission"


def test_deadline_interrupts_decoding_and_restores_signal_state(corpus: tuple[Path, dict[str, str | None]]) -> None:
    folder, _ = corpus
    fired: list[int] = []

    def handler(signum: int, frame: object) -> None:
        fired.append(signum)

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)  # someone else's timer must survive
        with pytest.raises(ImageFailure) as info:
            load_image(str(folder / "huge_6000x4000.jpg"), prep("exact", timeout=0.005))
        assert info.value.reason == "timeout"
        assert signal.getsignal(signal.SIGALRM) is handler
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 30.0 and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_deadline_interrupts_a_stalled_read() -> None:
    """The safety net for a read that never returns (stalled network mount): an empty pipe stands in for it."""
    read_end, write_end = os.pipe()
    alarm = decode._Alarm()
    try:
        with pytest.raises(decode._Timeout):
            alarm.start(0.2)
            try:
                os.read(read_end, 1)
            finally:
                alarm.cancel()
    finally:
        os.close(read_end)
        os.close(write_end)
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0


def test_works_outside_the_main_thread(corpus: tuple[Path, dict[str, str | None]]) -> None:
    folder, _ = corpus
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(load_image(str(folder / "good.jpg"), prep())))
    worker.start()
    worker.join()
    assert isinstance(result[0], np.ndarray) and result[0].shape == (224, 224, 3)


def test_image_failure_is_picklable_and_prints_its_reason() -> None:
    failure = pickle.loads(pickle.dumps(ImageFailure("truncated", "image file is truncated")))
    assert (failure.reason, failure.message, str(failure)) == ("truncated", "image file is truncated",
                                                               "truncated: image file is truncated")
    assert REASONS == ("missing", "permission", "is_directory", "symlink_loop", "not_regular_file", "empty",
                       "not_image", "truncated", "corrupt", "too_large", "timeout", "error")


def test_tar_members_decode_like_files_and_fail_with_reasons(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An image inside a tar (read by offset) decodes exactly as the same file; damaged members get reasons."""
    import io
    import tarfile

    from featshard.store.inputs import iter_items, open_input

    monkeypatch.setenv("FEATSHARD_CACHE_DIR", str(tmp_path / "cache"))
    good = tmp_path / "good.jpg"
    Image.fromarray(textured(300, 200, 3)).save(good, quality=90)
    members = {"good.jpg": good.read_bytes(), "text.jpg": b"this is not an image at all",
               "cut.png": _png_bytes()[:200], "empty.jpg": b""}
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    items = {i.name: i for i in iter_items(open_input(tmp_path / "s.tar"))}
    p = prep("exact")
    assert np.array_equal(load_image(items["s.tar/good.jpg"].path, p), load_image(str(good), p))
    for name, reason in [("text.jpg", "not_image"), ("cut.png", "truncated"), ("empty.jpg", "empty")]:
        with pytest.raises(ImageFailure) as err:
            load_image(items[f"s.tar/{name}"].path, p)
        assert err.value.reason == reason, (name, err.value)
    (tmp_path / "s.tar").unlink()
    with pytest.raises(ImageFailure) as err:
        load_image(items["s.tar/good.jpg"].path, p)
    assert err.value.reason == "missing"


def _png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(textured(200, 150, 4)).save(buf, "PNG")
    return buf.getvalue()

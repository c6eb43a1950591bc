"""A bad / odd image corpus (issue 3, "Bad input"), generated with numpy + Pillow from a fixed seed; no fixtures.

`make_corpus(folder)` writes every entry into `folder` (best a fresh, empty one) and returns
`[(relative file name, expected reason or None for success), ...]`, reasons as in `featshard.extract.decode.REASONS`.

Notes for callers:
- `missing.jpg` is listed but never created; `dangling_link.jpg` points at nothing.
- `noperm.jpg` is chmod 000. Root (tests often run as root in containers) can read it anyway, so the expectation is
  decided by trying: `"permission"` when this process cannot open it, `None` (it decodes) when it can.
- `NEWLINE_NAME` contains a newline: it fits a (quoted) CSV input only, not a one-path-per-line list.
- `a_directory.jpg` is a directory and `symlink_loop_*.jpg` / `fifo.jpg` are not files: a directory scan will not list
  them; give them in a list or CSV.
- The two decompression bombs exceed the default `Preprocess.max_pixels`; no special limit is needed.
- The same path listed twice is an input-list matter: list any entry twice.
Images are photo-like (smooth colour fields + mid-frequency texture + pixel noise), never flat.
"""
from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

SEED = 20240611
NEWLINE_NAME = "new\nline.jpg"
Writer = Callable[[Path], Any]


def textured(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 (height, width, 3) image: colour gradients, texture and noise."""
    rng = np.random.default_rng(SEED + seed)

    def field(cells_w: int, cells_h: int, resample: Image.Resampling) -> np.ndarray:
        small = rng.integers(0, 256, (cells_h, cells_w, 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(small).resize((width, height), resample), dtype=np.int16)

    coarse = field(5, 4, Image.Resampling.BICUBIC)
    texture = field(max(2, width // 12), max(2, height // 12), Image.Resampling.BILINEAR)
    noise = rng.integers(-10, 11, (height, width, 3), dtype=np.int16)
    return np.clip(coarse * 3 // 4 + texture // 4 + noise, 0, 255).astype(np.uint8)


def _img(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    im = Image.fromarray(textured(width, height, seed))
    return im if mode == "RGB" else im.convert(mode)


def _file(fmt: str, width: int, height: int, seed: int, mode: str = "RGB", **kw: Any) -> Writer:
    return lambda path: _img(width, height, seed, mode).save(path, fmt, **kw)


def _encoded(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _data(make: Callable[[], bytes]) -> Writer:
    return lambda path: path.write_bytes(make())


def _truncated(fmt: str) -> bytes:
    data = _encoded(_img(400, 300, 1), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return data[: len(data) // 2]


def _corrupt_middle_jpeg() -> bytes:
    """1000 random bytes over the middle of the entropy-coded data, none 0xFF (so no fake markers): libjpeg decodes
    the garbage with artefacts and only warns. Pillow returns an image: lenient, and accepted as a success."""
    data = bytearray(_encoded(_img(400, 300, 2), "JPEG", quality=90))
    mid = len(data) // 2
    data[mid: mid + 1000] = np.random.default_rng(SEED).integers(0, 255, 1000, dtype=np.uint8).tobytes()
    return bytes(data)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def _corrupt_middle_png() -> bytes:
    """Garbage over the middle scanlines, then validly compressed (zlib cannot hide it, CRCs are right): the rows'
    filter-type bytes become impossible values and Pillow's PNG decoder fails. Independent of the zlib build."""
    rgb = textured(400, 300, 3)
    raw = bytearray(np.concatenate([np.zeros((300, 1), np.uint8), rgb.reshape(300, -1)], 1).tobytes())
    mid = len(raw) // 2
    raw[mid: mid + 4000] = np.random.default_rng(SEED).integers(5, 256, 4000, dtype=np.uint8).tobytes()
    return _png(400, 300, 8, 2, zlib.compress(bytes(raw), 6))


def _corrupt_header_jpeg() -> bytes:
    data = bytearray(_encoded(_img(200, 150, 4), "JPEG"))
    dht = data.index(b"\xff\xc4")
    data[dht + 5: dht + 21] = b"\xff" * 16  # impossible Huffman code counts: libjpeg refuses the table
    return bytes(data)


def _bomb(side: int) -> bytes:
    """A valid 1-bit PNG of side x side black pixels: tens of kB on disk, hundreds of megapixels decoded."""
    comp = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)
    parts = [comp.compress(row * 1000) for _ in range(side // 1000)]
    parts += [comp.compress(row * (side % 1000)), comp.flush()]
    return _png(side, side, 1, 0, b"".join(parts))


def _huge_jpeg(path: Path) -> None:
    """6000x4000, legal: must decode with bounded memory (draft in fast mode)."""
    _img(1500, 1000, 5).resize((6000, 4000), Image.Resampling.BICUBIC).save(path, "JPEG", quality=85)


def cmyk_array(width: int = 320, height: int = 240) -> np.ndarray:
    """A CMYK (Pillow's convention) array with a real K channel: the source of the CMYK and YCCK entries."""
    cmyk = np.asarray(_img(width, height, 6).convert("CMYK")).copy()
    cmyk[..., 3] = np.linspace(0, 96, width, dtype=np.float32).astype(np.uint8)[None, :]
    return cmyk


def _ycck_jpeg() -> bytes:
    """Adobe YCCK JPEG (what Photoshop writes for CMYK). Pillow cannot encode YCCK, so: YCbCr of (C, M, Y) and 255 - K
    go through Pillow's inverted-CMYK encoder (it stores 255 - value), then the Adobe APP14 transform byte is flipped
    from 0 (CMYK) to 2 (YCCK). libjpeg + Pillow's Adobe inversion then decode it back to `cmyk_array()`."""
    cmyk = cmyk_array().astype(np.float32)
    c, m, y = cmyk[..., 0], cmyk[..., 1], cmyk[..., 2]
    luma = 0.299 * c + 0.587 * m + 0.114 * y
    cb = -0.168736 * c - 0.331264 * m + 0.5 * y + 128
    cr = 0.5 * c - 0.418688 * m - 0.081312 * y + 128
    stored = np.clip(np.rint(np.stack([255 - luma, 255 - cb, 255 - cr, cmyk[..., 3]], -1)), 0, 255)
    data = bytearray(_encoded(Image.fromarray(stored.astype(np.uint8), "CMYK"), "JPEG", quality=95))
    app14 = data.index(b"Adobe") - 4  # FF EE, length, "Adobe", version, flags0, flags1, transform
    assert data[app14: app14 + 2] == b"\xff\xee" and data[app14 + 15] == 0, "no Adobe CMYK marker"
    data[app14 + 15] = 2
    return bytes(data)


def _exif_rotated(path: Path) -> None:
    """Stored rotated; EXIF orientation 6 says "rotate 90 degrees clockwise to display"."""
    exif = Image.Exif()
    exif[0x0112] = 6
    _img(320, 240, 7).transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", exif=exif, quality=90)


def _animated(fmt: str) -> Writer:
    def write(path: Path) -> None:
        frames = [_img(160, 120, 10 + i) for i in range(3)]
        frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100)
    return write


def _palette_transparent(fmt: str) -> Writer:
    def write(path: Path) -> None:
        im = _img(200, 150, 8).quantize(64)
        idx = np.asarray(im).copy()
        idx[:50, :60] = 0  # a transparent corner
        out = Image.fromarray(idx, "P")
        out.putpalette(im.getpalette())
        out.save(path, fmt, transparency=0)
    return write


def _with_alpha(mode: str) -> Writer:
    def write(path: Path) -> None:
        rgb = Image.fromarray(textured(200, 150, 9))
        alpha = Image.fromarray(np.tile(np.linspace(0, 255, 200).astype(np.uint8), (150, 1)))
        bands = (rgb.convert("L"), alpha) if mode == "LA" else (*rgb.split(), alpha)
        Image.merge(mode, bands).save(path, "PNG")
    return write


def _scalar_tiff(kind: str) -> Writer:
    def write(path: Path) -> None:
        luma = textured(200, 150, 12).astype(np.float32).mean(-1)
        if kind == "I;16":
            Image.fromarray((luma * 257).astype(np.uint16)).save(path, "PNG")
        elif kind == "I":
            Image.fromarray((luma * 100).astype(np.int32)).save(path, "TIFF")
        else:
            Image.fromarray(luma / 255).save(path, "TIFF")
    return write


def _special(kind: str, target: str = "") -> Writer:
    def write(path: Path) -> None:
        if kind == "dir":
            path.mkdir()
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "link":  # may dangle, or point at its partner to make a loop
            os.symlink(target, path)
        elif kind == "noperm":
            _img(200, 150, 13).save(path, "JPEG")
            os.chmod(path, 0)
    return write


def _permission_expectation(path: Path) -> str | None:
    """`permission` when this process cannot open a mode-000 file; None as root (CAP_DAC_OVERRIDE reads it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:
        return "permission"
    os.close(fd)
    return None


def _entries() -> list[tuple[str, Writer, str | None]]:
    def jpg(seed: int, **kw: Any) -> Writer:
        return _file("JPEG", 320, 240, seed, quality=90, **kw)

    return [
        ("good.jpg", jpg(20), None),
        ("good.png", _file("PNG", 300, 400, 21), None),
        ("progressive.jpg", _file("JPEG", 640, 480, 22, quality=90, progressive=True), None),
        ("photo.webp", _file("WEBP", 320, 240, 23, quality=85), None),
        ("photo.bmp", _file("BMP", 300, 200, 24), None),
        ("photo.tiff", _file("TIFF", 300, 200, 25, compression="tiff_lzw"), None),
        ("gray.jpg", _file("JPEG", 320, 240, 26, "L"), None),
        ("gray.png", _file("PNG", 240, 320, 27, "L"), None),
        ("gray16.png", _scalar_tiff("I;16"), None),
        ("int32.tiff", _scalar_tiff("I"), None),
        ("float.tiff", _scalar_tiff("F"), None),
        ("bilevel.png", _file("PNG", 200, 150, 28, "1"), None),
        ("palette_transparent.png", _palette_transparent("PNG"), None),
        ("palette_transparent.gif", _palette_transparent("GIF"), None),
        ("rgba.png", _with_alpha("RGBA"), None),
        ("la.png", _with_alpha("LA"), None),
        ("cmyk.jpg", lambda p: Image.fromarray(cmyk_array(), "CMYK").save(p, "JPEG", quality=95), None),
        ("ycck.jpg", _data(_ycck_jpeg), None),
        ("animated.gif", _animated("GIF"), None),
        ("animated.webp", _animated("WEBP"), None),
        ("exif_rotated.jpg", _exif_rotated, None),
        ("one_pixel.png", _file("PNG", 1, 1, 29), None),
        ("one_pixel.jpg", _file("JPEG", 1, 1, 30), None),
        ("tall_1x5000.png", _file("PNG", 1, 5000, 31), None),
        ("wide_5000x1.png", _file("PNG", 5000, 1, 32), None),
        ("huge_6000x4000.jpg", _huge_jpeg, None),
        ("name with spaces.jpg", jpg(33), None),
        ("comma,name.jpg", jpg(34), None),
        ("quote'single\"double.jpg", jpg(35), None),
        ("ünïcødé-画像-фото.jpg", jpg(36), None),
        (NEWLINE_NAME, jpg(37), None),
        ("link_to_good.jpg", _special("link", "good.jpg"), None),
        ("corrupt_middle.jpg", _data(_corrupt_middle_jpeg), None),
        ("missing.jpg", lambda path: None, "missing"),
        ("dangling_link.jpg", _special("link", "does-not-exist.jpg"), "missing"),
        ("noperm.jpg", _special("noperm"), "permission"),
        ("a_directory.jpg", _special("dir"), "is_directory"),
        ("empty.jpg", _data(lambda: b""), "empty"),
        ("text.jpg", _data(lambda: b"just some text, not an image\n" * 40), "not_image"),
        ("page.jpg", _data(lambda: b"<!DOCTYPE html><html><head><title>404</title></head><body>gone</body></html>\n"),
         "not_image"),
        ("document.pdf.jpg", _data(lambda: b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<<>>\n%%EOF\n"),
         "not_image"),
        ("truncated.jpg", _data(lambda: _truncated("JPEG")), "truncated"),
        ("truncated.png", _data(lambda: _truncated("PNG")), "truncated"),
        ("corrupt_middle.png", _data(_corrupt_middle_png), "corrupt"),
        ("corrupt_header.jpg", _data(_corrupt_header_jpeg), "corrupt"),
        ("bomb_400mp.png", _data(lambda: _bomb(20000)), "too_large"),
        ("bomb_196mp.png", _data(lambda: _bomb(14000)), "too_large"),
        ("symlink_loop_a.jpg", _special("link", "symlink_loop_b.jpg"), "symlink_loop"),
        ("symlink_loop_b.jpg", _special("link", "symlink_loop_a.jpg"), "symlink_loop"),
        ("fifo.jpg", _special("fifo"), "not_regular_file"),
    ]


def corpus_names() -> list[str]:
    """The entry names in `make_corpus` order, without writing anything (for test parametrisation)."""
    return [name for name, _, _ in _entries()]


def make_corpus(folder: Path) -> list[tuple[str, str | None]]:
    """Write the corpus into `folder` (created if needed); return (name, expected reason or None) per entry."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    result = []
    for name, write, expected in _entries():
        path = folder / name
        _remove(path)
        write(path)
        if name == "noperm.jpg":
            expected = _permission_expectation(path)
        result.append((name, expected))
    return result


def _remove(path: Path) -> None:
    """Allow a re-run on the same folder (the fifo, links and the mode-000 file included)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()

"""`--decode gpu`: JPEGs decoded on the device (batched nvjpeg via `torchvision.io.decode_jpeg`), resized there.

Division of work: the loader processes only read a file's bytes and parse its JPEG header (`read_encoded`: format,
colour mode, size limit, EXIF orientation, all without decoding); anything that is not a plain RGB/greyscale JPEG is
decoded on the CPU as usual (`decode.load_image`). On the device, `decode_batch` decodes the whole batch with one
`decode_jpeg(list, device=...)` call; if that call fails (one damaged file fails the whole call) every image is
retried alone, and an image the device cannot decode is decoded by `decode.load_image` on the CPU, which also
classifies a truly broken file as a failure of that row only. One bad file never kills a batch.

Geometry follows the CPU path (torchvision's preset): EXIF orientation, shorter side to `prep.resize` with the
preset's interpolation and antialiasing (`torchvision.transforms.v2.functional.resize` on float pixels), centre crop
(zero padded when smaller), then rounded to whole levels like the CPU's uint8 output. The same code runs with
device "cpu" (what the CPU-only tests exercise); on a GPU, nvjpeg does the decoding.
"""
from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from featshard.extract.decode import ImageFailure, load_image
from featshard.extract.preprocess import Preprocess
from featshard.store.webdataset import TarMember, read_member

log = logging.getLogger("featshard.extract.gpudecode")
_DEVICE_FORMATS = ("JPEG", "MPO")
_DEVICE_MODES = ("RGB", "L")
_DEVICE_RESAMPLE = ("bilinear", "bicubic")  # what tensor resize does like PIL (antialiased); others stay on the CPU
_ORIENTATION_TAG = 0x0112


@dataclass
class Encoded:
    """A JPEG's bytes, for decoding on the device; `path` (a file, a tar member, or the bytes themselves for an
    upload) is kept for the CPU fallback."""

    data: bytes
    orientation: int
    path: str | bytes | TarMember


def read_encoded(path: str | bytes | TarMember, prep: Preprocess) -> Encoded | None:
    """The file's bytes when the device can decode it (a plain RGB or greyscale JPEG within max_pixels, ending with
    its end-of-image marker); None for anything else (other formats, CMYK, truncated or odd files, unreadable
    headers, interpolations other than bilinear/bicubic): the caller decodes those on the CPU."""
    from PIL import Image

    if prep.interpolation not in _DEVICE_RESAMPLE:
        return None
    try:
        data = _read_bytes(path)
        if data is None:
            return None
        if not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):  # no end marker: truncated? the CPU path decides
            return None
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in _DEVICE_FORMATS or im.mode not in _DEVICE_MODES:
                return None
            if im.size[0] * im.size[1] > prep.max_pixels:
                return None
            orientation = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - whatever is odd about the file, the CPU path classifies it
        return None
    return Encoded(data, orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1, path)


def _read_bytes(path: str | bytes | TarMember) -> bytes | None:
    """A file's bytes, or a tar member's (or the bytes given); None for an empty or non-regular file."""
    if isinstance(path, bytes):
        return path or None
    if isinstance(path, TarMember):
        return read_member(path) or None
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return None
    with open(path, "rb") as fh:
        return fh.read()


def orient(x: Any, orientation: int) -> Any:
    """Apply EXIF orientation to a (C, H, W) tensor, as PIL's `ImageOps.exif_transpose`."""
    import torch

    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-1).flip(-2)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(x, -1, dims=(-2, -1))
    if orientation == 7:
        return x.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return torch.rot90(x, 1, dims=(-2, -1))
    return x


def resize_crop(x: Any, prep: Preprocess) -> Any:
    """(C, H, W) uint8 on any device -> (3, crop, crop) float32 in [0, 255], whole levels, like the CPU path."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    x = x.float()
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    x = F.resize(x, [prep.resize], interpolation=InterpolationMode(prep.interpolation), antialias=prep.antialias)
    x = F.center_crop(x, [prep.crop, prep.crop])
    return x.round_().clamp_(0, 255)


def _device_decode(datas: list[Any], device: Any) -> list[Any | None]:
    """Decode on `device`: one batched call, or image by image when the batch call fails; None where it failed."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 marks its decoders deprecated in favour of torchcodec
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except Exception as exc:  # noqa: BLE001 - a damaged file fails the whole call: retry one by one
            log.debug("batched device decode failed (%s); decoding image by image", exc)
        out: list[Any | None] = []
        for data in datas:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except Exception:  # noqa: BLE001 - the CPU fallback decides whether the file is really broken
                out.append(None)
        return out


def _cpu_fallback(path: str | bytes | TarMember, prep: Preprocess) -> np.ndarray | ImageFailure:
    try:
        return load_image(path, prep)
    except ImageFailure as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - one bad image must never kill a batch
        return ImageFailure("error", f"{type(exc).__name__}: {exc}")


def decode_batch(batch: Any, prep: Preprocess, device: Any) -> Any:
    """Pixels of a loader Batch whose `encoded` list is set, as float (N, 3, crop, crop) in [0, 255] on `device`.

    `batch.encoded[i]` is an Encoded for row i (decoded here) or None (its pixels are the next of `batch.pixels`,
    decoded by the loader). Rows that cannot be decoded at all are moved to the batch's failed lists, in place."""
    import torch

    encoded = [e for e in batch.encoded if e is not None]
    decoded = iter(_device_decode([torch.frombuffer(bytearray(e.data), dtype=torch.uint8) for e in encoded], device))
    cpu_pixels = iter(batch.pixels.to(device, non_blocking=True) if batch.pixels.numel() else [])
    images: list[Any] = []
    failed: list[tuple[int, ImageFailure]] = []
    for i, enc in enumerate(batch.encoded):
        if enc is None:
            images.append(next(cpu_pixels).permute(2, 0, 1).float())
            continue
        img = next(decoded)
        if img is not None:
            images.append(resize_crop(orient(img, enc.orientation), prep))
            continue
        arr = _cpu_fallback(enc.path, prep)
        if isinstance(arr, ImageFailure):
            failed.append((i, arr))
        else:
            images.append(torch.from_numpy(arr).to(device).permute(2, 0, 1).float())
    if failed:
        _move_failed(batch, failed)
    if not images:
        return torch.zeros((0, 3, prep.crop, prep.crop), device=device)
    return torch.stack(images).contiguous(memory_format=torch.channels_last)


def _move_failed(batch: Any, failed: list[tuple[int, ImageFailure]]) -> None:
    """Move rows that failed on the device and on the CPU from the batch's ok lists to its failed lists."""
    drop = {i for i, _ in failed}
    moved = [(batch.rows[i], batch.names[i], str(exc)) for i, exc in failed]
    merged = sorted([*zip(batch.failed_rows, batch.failed_names, batch.failed_reasons), *moved])
    batch.failed_rows = [r for r, _, _ in merged]
    batch.failed_names = [n for _, n, _ in merged]
    batch.failed_reasons = [why for _, _, why in merged]
    batch.rows = [r for i, r in enumerate(batch.rows) if i not in drop]
    batch.names = [n for i, n in enumerate(batch.names) if i not in drop]
    batch.encoded = [e for i, e in enumerate(batch.encoded) if i not in drop]

"""`--decode gpu`: JPEGs decoded on the device (batched nvJPEG via `torchvision.io.decode_jpeg`), resized there.

Division of work: the loader processes only read a file's bytes and check its JPEG header (`read_encoded`: format,
colour mode, size limit, EXIF orientation, and `device_decodable`, a walk over the markers before the first scan,
nothing decoded). What the device would decode slowly or differently stays on the CPU loaders (`decode.load_image`):
non-JPEGs, progressive and arithmetic-coded JPEGs (nvJPEG decodes their Huffman stage on the host, one at a time),
CMYK/YCCK, RGB-coded ones (an Adobe marker saying so), unusual chroma subsampling, extreme aspect ratios, and headers
whose Huffman tables libjpeg would refuse (a damaged file costs nothing on the device).

On the device, `decode_batch` decodes the batch with one `decode_jpeg(list, device=...)` call. One damaged file
fails the whole call (torchvision returns no partial result): the list is then halved and each half decoded again,
down to the files that fail alone, so one bad file costs about 2 log2(N) extra calls of shrinking size and one CPU
decode (`decode.load_image`, which also classifies a truly broken file as a failure of that row only), never a
batch of single decodes. `torch.cuda.current_stream().synchronize()` comes right before every device decode:
torchvision 0.29's CUDA decoder allocates its outputs on the caller's stream but writes them from its own stream
without waiting (pytorch/vision#9606), so it could overwrite memory that work still queued on the caller's stream
reads (the previous batch's resize, on the same side stream).

Geometry follows the CPU path (torchvision's preset): EXIF orientation, shorter side to `prep.resize` with the
preset's interpolation and antialiasing (`torchvision.transforms.v2.functional.resize` on float pixels), centre crop
(zero padded when smaller), then rounded to whole levels like the CPU's uint8 output. Images of the same decoded size
are resized together (one call per size bucket). The same code runs with device "cpu" (what the CPU-only tests
exercise); on a GPU, nvJPEG does the decoding.
"""
from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

from featshard.extract.jpegheader import device_decodable
from featshard.extract.batch import Batch, Encoded
from featshard.extract.decode import ImageFailure, load_image
from featshard.extract.preprocess import Preprocess
from featshard.store.webdataset import TarMember, read_member

if TYPE_CHECKING:
    import torch

log = logging.getLogger("featshard.extract.gpudecode")
_DEVICE_FORMATS = ("JPEG", "MPO")
_DEVICE_MODES = ("RGB", "L")
_DEVICE_RESAMPLE = ("bilinear", "bicubic")  # what tensor resize does like PIL (antialiased); others stay on the CPU
_ORIENTATION_TAG = 0x0112
_MAX_ASPECT = 64  # longer/shorter side beyond this: the CPU (its resize never materialises the whole long side)
_RESIZE_SLICE = 32  # images of one size resized per call: bounds the float copies (a 12 MP image is 144 MB)


def read_encoded(path: str | bytes | TarMember, prep: Preprocess) -> Encoded | None:
    """The file's bytes when the device can decode it as the CPU would (a sequential RGB or greyscale JPEG within
    max_pixels, ending with its end-of-image marker, a header `device_decodable` accepts); None for anything else
    (other formats, progressive, CMYK, truncated or odd files, unreadable headers, interpolations other than
    bilinear/bicubic): the caller decodes those on the CPU."""
    from PIL import Image

    if prep.interpolation not in _DEVICE_RESAMPLE:
        return None
    try:
        data = _read_bytes(path)
        if data is None:
            return None
        if not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):  # no end marker: truncated? the CPU path decides
            return None
        if not device_decodable(data):
            return None
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in _DEVICE_FORMATS or im.mode not in _DEVICE_MODES:
                return None
            width, height = im.size
            if width * height > prep.max_pixels or max(width, height) > _MAX_ASPECT * min(width, height):
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


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
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


def resize_crop(x: torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """(..., C, H, W) uint8 on any device -> (..., 3, crop, crop) float32 in [0, 255], whole levels, like the CPU
    path; a batch of images of one size is resized in one call."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    x = x.float()
    if x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    x = F.resize(x, [prep.resize], interpolation=InterpolationMode(prep.interpolation), antialias=prep.antialias)
    x = F.center_crop(x, [prep.crop, prep.crop])
    return x.round_().clamp_(0, 255)


def _decode_call(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # pytorch/vision#9606: see the module's docstring
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 marks its decoders deprecated in favour of torchcodec
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))


def device_decode(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode on `device` in one batched call; when it fails, each half again (recursively): None where an image
    fails alone (the CPU fallback decides whether the file is really broken)."""
    if not datas:
        return []
    try:
        return _decode_call(datas, device)
    except Exception as exc:  # noqa: BLE001 - a damaged file fails the whole call
        if len(datas) == 1:
            log.debug("device decode failed: %s", exc)
            return [None]
    half = (len(datas) + 1) // 2
    return device_decode(datas[:half], device) + device_decode(datas[half:], device)


def _cpu_fallback(path: str | bytes | TarMember, prep: Preprocess) -> np.ndarray | ImageFailure:
    try:
        return load_image(path, prep)
    except ImageFailure as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - one bad image must never kill a batch
        return ImageFailure("error", f"{type(exc).__name__}: {exc}")


def decode_batch(batch: Batch, prep: Preprocess, device: torch.device) -> torch.Tensor:
    """Pixels of a loader Batch whose `encoded` list is set, as float (N, 3, crop, crop) in [0, 255] on `device`,
    channels_last.

    `batch.encoded[i]` is an Encoded for row i (decoded here) or None (its pixels are the next of `batch.pixels`,
    decoded by the loader). Rows that cannot be decoded at all are moved to the batch's failed lists, in place."""
    import torch

    if batch.encoded is None:
        raise ValueError("decode_batch takes a batch the loaders handed over for a device decode (batch.encoded)")
    encoded = batch.encoded
    device = torch.device(device)
    out = torch.empty((len(encoded), 3, prep.crop, prep.crop), dtype=torch.float32, device=device,
                      memory_format=torch.channels_last)
    host = [i for i, e in enumerate(encoded) if e is None]
    if host:
        out[_index(host, device)] = batch.pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    mine = [(i, e) for i, e in enumerate(encoded) if e is not None]
    decoded = device_decode([torch.frombuffer(bytearray(e.data), dtype=torch.uint8) for _, e in mine], device)
    buckets: dict[tuple[int, ...], list[tuple[int, Any]]] = defaultdict(list)
    fallback: list[tuple[int, np.ndarray]] = []
    failed: list[tuple[int, ImageFailure]] = []
    for (i, enc), img in zip(mine, decoded):
        if img is not None:
            img = orient(img, enc.orientation)
            buckets[tuple(img.shape)].append((i, img))
            continue
        arr = _cpu_fallback(enc.path, prep)
        (failed if isinstance(arr, ImageFailure) else fallback).append((i, arr))  # type: ignore[arg-type]
    for members in buckets.values():
        for k in range(0, len(members), _RESIZE_SLICE):
            part = members[k: k + _RESIZE_SLICE]
            out[_index([i for i, _ in part], device)] = resize_crop(torch.stack([img for _, img in part]), prep)
    if fallback:
        pixels = torch.from_numpy(np.stack([a for _, a in fallback])).to(device)
        out[_index([i for i, _ in fallback], device)] = pixels.permute(0, 3, 1, 2).float()
    if not failed:
        return out
    _move_failed(batch, failed)
    drop = {i for i, _ in failed}
    keep = [i for i in range(out.shape[0]) if i not in drop]
    return out[_index(keep, device)].contiguous(memory_format=torch.channels_last)


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    import torch

    return torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)


def _move_failed(batch: Batch, failed: list[tuple[int, ImageFailure]]) -> None:
    """Move rows that failed on the device and on the CPU from the batch's ok lists to its failed lists."""
    drop = {i for i, _ in failed}
    moved = [(batch.rows[i], batch.names[i], str(exc)) for i, exc in failed]
    merged = sorted([*zip(batch.failed_rows, batch.failed_names, batch.failed_reasons), *moved])
    batch.failed_rows = [r for r, _, _ in merged]
    batch.failed_names = [n for _, n, _ in merged]
    batch.failed_reasons = [why for _, _, why in merged]
    batch.rows = [r for i, r in enumerate(batch.rows) if i not in drop]
    batch.names = [n for i, n in enumerate(batch.names) if i not in drop]
    batch.encoded = [e for i, e in enumerate(batch.encoded or []) if i not in drop]

"""WebDataset tars for tests, laid out like img2dataset's output: per sample `KEY.jpg` (or .png) + `KEY.json` +
`KEY.txt`, `{shard:05d}.tar` files with their `_stats.json` and `.parquet` beside them."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Callable

from helpers.images import photo


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (96, 72)) -> bytes:
    buf = io.BytesIO()
    photo(seed, *size).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    tf.addfile(info, io.BytesIO(data))


def make_tars(folder: Path, per_tar: list[int], seed: int = 0,
              data_for: Callable[[int, int], bytes] | None = None) -> list[Path]:
    """Tars of `per_tar[i]` samples each; sample j of tar i is an image from `data_for(i, j)` (default: a JPEG,
    every third a PNG) with .json and .txt sidecars; every tar also ends with a sidecar-only sample."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for t, n in enumerate(per_tar):
        path = folder / f"{t:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
            for j in range(n):
                key = f"{t:05d}{j:04d}"
                ext = "png" if j % 3 == 2 else "jpg"
                data = data_for(t, j) if data_for else image_bytes(seed * 10_000 + t * 100 + j,
                                                                   "PNG" if ext == "png" else "JPEG")
                add_member(tf, f"{key}.{ext}", data)
                add_member(tf, f"{key}.json", json.dumps({"key": key, "caption": f"sample {j}"}).encode())
                add_member(tf, f"{key}.txt", f"sample {j}".encode())
            add_member(tf, f"{t:05d}9999.json", b"{}")  # a failed download: metadata only, no image
        (folder / f"{t:05d}_stats.json").write_text("{}")
        (folder / f"{t:05d}.parquet").write_bytes(b"not read")
        paths.append(path)
    return paths


def member_names(per_tar: list[int]) -> list[str]:
    """The input names make_tars' samples get, in row order."""
    return [f"{t:05d}.tar/{t:05d}{j:04d}.{'png' if j % 3 == 2 else 'jpg'}" for t, n in enumerate(per_tar)
            for j in range(n)]


def overwrite_in_place(path: Path, offset: int, data: bytes) -> None:
    """Write `data` at `offset` of the file without changing its size, inode or mtime (its identity)."""
    st = os.stat(path)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

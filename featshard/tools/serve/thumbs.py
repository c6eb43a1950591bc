"""JPEG thumbnails of stored images for the server's gallery, in a byte-bounded in-memory LRU cache.

In memory, not on disk: thumbnails of a gallery page are small (~10 KB at 256 px), a restart re-creates the few that
are asked for, and nothing is written next to the user's run. A thumbnail is made with the same safety as a decode
for a run: the header's pixel count is checked against the run's `max_pixels` before anything is decoded, JPEGs are
draft-decoded at a reduced scale, EXIF orientation is applied.
"""
from __future__ import annotations

import io
import threading
from collections import OrderedDict

from featshard.extract.decode import ImageFailure, open_source
from featshard.store.webdataset import TarMember

THUMB_SIZE = 256
THUMB_QUALITY = 85


def make_thumbnail(path: str | TarMember, max_pixels: int, size: int = THUMB_SIZE) -> bytes:
    """The image at `path` (a regular file, or a member of a tar) as a JPEG no larger than size x size;
    ImageFailure when it cannot be."""
    from PIL import Image, ImageOps

    with open_source(path) as fh:
        try:
            im: Image.Image = Image.open(fh)
            width, height = im.size
            if width * height > max_pixels:
                raise ImageFailure("too_large", f"{width}x{height} pixels > max_pixels {max_pixels}")
            im.draft("RGB", (size, size))
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGB")
            im.thumbnail((size, size), Image.Resampling.BICUBIC)
            out = io.BytesIO()
            im.save(out, "JPEG", quality=THUMB_QUALITY, optimize=True)
            return out.getvalue()
        except ImageFailure:
            raise
        except Image.DecompressionBombError as exc:  # Pillow's own limit, met on open: still nothing decoded
            raise ImageFailure("too_large", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a bad stored file is a 4xx for this request, not a crash
            raise ImageFailure("corrupt", f"{type(exc).__name__}: {exc}") from None


class ThumbCache:
    """Least-recently-used thumbnails by id, at most `max_bytes` in total; safe to use from several threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.items: OrderedDict[int, bytes] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self.lock = threading.Lock()

    def get(self, key: int) -> bytes | None:
        with self.lock:
            data = self.items.get(key)
            if data is None:
                self.misses += 1
                return None
            self.items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: int, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self.lock:
            old = self.items.pop(key, None)
            self.bytes -= len(old) if old is not None else 0
            self.items[key] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                _, dropped = self.items.popitem(last=False)
                self.bytes -= len(dropped)

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {"items": len(self.items), "bytes": self.bytes, "hits": self.hits, "misses": self.misses}

"""What the loaders hand the extractor: a `Batch` of decoded rows (uint8 pixels) and failed rows, and, for a device
decode, the `Encoded` JPEG bytes of the rows the device decodes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from featshard.store.webdataset import TarMember


@dataclass
class Encoded:
    """A JPEG's bytes, for decoding on the device; `path` (a file, a tar member, or the bytes themselves for an
    upload) is kept for the CPU fallback."""

    data: bytes
    orientation: int
    path: str | bytes | TarMember


@dataclass
class Batch:
    rows: list[int]
    names: list[str]
    pixels: Any  # torch.uint8 tensor N x H x W x 3 (N may be 0)
    failed_rows: list[int]
    failed_names: list[str]
    failed_reasons: list[str]
    # --decode gpu only: per ok row, its JPEG bytes (decoded on the device) or None (its pixels are the next in
    # `pixels`); None when the loader decoded every image
    encoded: list[Encoded | None] | None = None

    @property
    def size(self) -> int:
        return len(self.rows) + len(self.failed_rows)

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pin-memory thread (GPU runs): page-locked pixels for async copies."""
        if self.pixels.numel():
            self.pixels = self.pixels.pin_memory()
        return self

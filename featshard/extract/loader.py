"""Loader: a torch DataLoader whose processes decode and resize; the worker receives uint8 batches and failures.

The batch sampler streams (row, name, path) items straight from the input list, chunk by chunk, so neither the worker
nor the loaders ever hold a shard's list; loader processes are persistent for the whole shard. A batch never straddles
a chunk boundary, so the consumer knows when a chunk is finished.

With `make_loader(..., device_decode=True)` (`--decode gpu` on a CUDA device) the loaders hand over the bytes of plain
JPEGs (`Batch.encoded`) for `Extractor.batch_to_device` to decode on the device, and decode everything else as usual.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from featshard.extract.decode import ImageFailure, load_image
from featshard.extract.gpudecode import Encoded, read_encoded
from featshard.store.inputs import InputSource, Item, iter_items
from featshard.store.webdataset import TarMember
from featshard.extract.preprocess import Preprocess
from featshard.system import cores


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


Sample = tuple[Item, "np.ndarray | Encoded | None", str]


class DecodeDataset:
    """Stateless map-style dataset: the 'index' is the Item itself, so nothing list-sized is pickled to loaders."""

    def __init__(self, prep: Preprocess, device_decode: bool = False) -> None:
        self.prep = prep
        self.device_decode = device_decode

    def __getitem__(self, item: Item) -> Sample:
        try:
            return item, decode_one(item.path, self.prep, self.device_decode), ""
        except ImageFailure as exc:
            return item, None, str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad image must never kill a batch
            return item, None, f"error: {type(exc).__name__}: {exc}"


def decode_one(path: str | bytes | TarMember, prep: Preprocess, device_decode: bool = False) -> np.ndarray | Encoded:
    """One image as the loaders hand it over: its JPEG bytes when the device decodes it, else its decoded crop
    (uint8 crop x crop x 3); ImageFailure when it cannot be read. `path` may be the image's bytes (an upload)."""
    if device_decode:
        encoded = read_encoded(path, prep)
        if encoded is not None:
            return encoded
    return load_image(path, prep)


def collate(samples: Sequence[Sample]) -> Batch:
    """Decoded pixels stacked (uint8 N x H x W x 3, in row order), failures apart, JPEG bytes (gpu decode) kept."""
    import torch

    ok = [(item, arr) for item, arr, _ in samples if arr is not None]
    bad = [(item, reason) for item, arr, reason in samples if arr is None]
    arrays = [a for _, a in ok if isinstance(a, np.ndarray)]
    pixels = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros((0, 0, 0, 3), dtype=torch.uint8)
    encoded = [a if isinstance(a, Encoded) else None for _, a in ok]
    return Batch(
        rows=[i.row for i, _ in ok], names=[i.name for i, _ in ok], pixels=pixels,
        failed_rows=[i.row for i, _ in bad], failed_names=[i.name for i, _ in bad],
        failed_reasons=[r for _, r in bad], encoded=encoded if any(e is not None for e in encoded) else None,
    )


class ChunkBatches:
    """Batch sampler over the pending chunks: yields lists of Items, never crossing a chunk boundary.

    The input is streamed once from the first pending row to the last (rows of finished chunks in between are
    skipped), so a shard costs one pass over its span of the list whatever its number of chunks."""

    def __init__(self, source: InputSource, chunks: Sequence[tuple[int, int]], batch_size: int,
                 only_rows: Iterable[int] | None = None) -> None:
        self.source, self.chunks, self.batch_size = source, sorted(chunks), batch_size
        self.only_rows = None if only_rows is None else set(only_rows)

    def __iter__(self) -> Iterator[list[Item]]:
        if not self.chunks:
            return
        items = iter_items(self.source, self.chunks[0][0], self.chunks[-1][1])
        at = self.chunks[0][0]
        for lo, hi in self.chunks:
            for _ in islice(items, max(0, lo - at)):  # rows of finished chunks between two pending ones
                pass
            batch: list[Item] = []
            for item in islice(items, hi - max(lo, at)):
                if self.only_rows is not None and item.row not in self.only_rows:
                    continue
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            at = hi
            if batch:
                yield batch


def _loader_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)


def make_loader(batches: Iterable[list[Item]], prep: Preprocess, workers: int, pin: bool,
                device_decode: bool = False) -> Any:
    """A DataLoader over `batches` (a re-iterable of Item lists, e.g. ChunkBatches): `workers` loader processes
    decode in parallel (0: decode in this process, for debugging and tiny query sets). `device_decode` (pass
    `Extractor.device_decode`: `--decode gpu` on a CUDA device) hands plain JPEGs over as bytes: the consumer must
    then use `Extractor.batch_to_device(batch)`, which decodes them."""
    from torch.utils.data import DataLoader

    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs = dict(prefetch_factor=4, worker_init_fn=_loader_init,
                      timeout=max(120.0, prep.timeout * 8 + 60.0))
    return DataLoader(DecodeDataset(prep, device_decode), batch_sampler=batches, collate_fn=collate,
                      num_workers=workers, pin_memory=pin, **kwargs)


def decodes_on_device(prep: Preprocess, device: str) -> bool:
    """Whether JPEGs go to `device` as bytes (`--decode gpu` on a CUDA device); elsewhere `gpu` decodes as `fast`."""
    return prep.decode == "gpu" and device.startswith("cuda")


def default_loader_workers(devices_on_node: int) -> int:
    """Decode processes per device: the cores left after one per model worker, shared across devices (>= 1)."""
    n = cores()
    return max(1, (n - devices_on_node) // max(1, devices_on_node)) if n > devices_on_node else 1

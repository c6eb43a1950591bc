"""Loader: a torch DataLoader whose processes decode and resize; the worker receives uint8 batches and failures.

The batch sampler streams (row, name, path) items straight from the input list, chunk by chunk, so neither the worker
nor the loaders ever hold a shard's list; loader processes are persistent for the whole shard. A batch never straddles
a chunk boundary, so the consumer knows when a chunk is finished.

With `make_loader(..., device_decode=True)` (`--decode gpu` on a CUDA device) the loaders hand over the bytes of plain
JPEGs (`Batch.encoded`) for `Extractor.batch_to_device` to decode on the device, and decode everything else as usual.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from featshard.errors import UsageError
from featshard.extract.decode import ImageFailure, load_image
from featshard.extract.batch import Batch, Encoded
from featshard.extract.gpudecode import read_encoded
from featshard.store.inputs import InputSource, Item, iter_items
from featshard.store.webdataset import TarMember
from featshard.extract.preprocess import Preprocess
from featshard.system import CpuBudget, cpu_budget

if TYPE_CHECKING:
    import torch

log = logging.getLogger("featshard.extract.loader")
PREFETCH = 4  # batches each loader process keeps ready (the DataLoader's prefetch_factor)
MAX_LOADERS_PER_DEVICE = 32  # more decode processes per device stop paying off and cost memory and start-up
SHM_PATH = "/dev/shm"
SHM_HEADROOM = 0.8  # of the free /dev/shm a run plans to use: torch, NCCL or another job may need some too


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
    """Decoded pixels stacked (uint8 N x H x W x 3, in row order), failures apart, JPEG bytes (gpu decode) kept.
    In a loader process the pixels are stacked straight into shared memory (see `stack_pixels`)."""
    ok = [(item, arr) for item, arr, _ in samples if arr is not None]
    bad = [(item, reason) for item, arr, reason in samples if arr is None]
    pixels = stack_pixels([a for _, a in ok if isinstance(a, np.ndarray)])
    encoded = [a if isinstance(a, Encoded) else None for _, a in ok]
    return Batch(
        rows=[i.row for i, _ in ok], names=[i.name for i, _ in ok], pixels=pixels,
        failed_rows=[i.row for i, _ in bad], failed_names=[i.name for i, _ in bad],
        failed_reasons=[r for _, r in bad], encoded=encoded if any(e is not None for e in encoded) else None,
    )


def stack_pixels(arrays: list[np.ndarray]) -> torch.Tensor:
    """The arrays stacked into one uint8 tensor. In a loader process the tensor is allocated in shared memory and
    filled in place, the way torch's default_collate does, so handing it to the worker sends a file descriptor and
    copies nothing; otherwise torch would copy the batch into shared memory while pickling it, on the queue's feeder
    thread, where a full /dev/shm drops the batch with a printed traceback and the worker waits out the loader's
    timeout. Here a full /dev/shm raises in collate: an error the worker sees at once (a failed shard, never rows
    recorded as bad images)."""
    import torch
    from torch.utils.data import get_worker_info

    if not arrays:
        return torch.zeros((0, 0, 0, 3), dtype=torch.uint8)
    shape = (len(arrays), *arrays[0].shape)
    if get_worker_info() is None:
        return torch.from_numpy(np.stack(arrays))
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))  # noqa: SLF001 - what default_collate uses
    out = torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)  # type: ignore[call-overload]
    np.stack(arrays, out=out.numpy())
    return out


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


# loader processes are forked where the platform can (they start in milliseconds, sharing the worker's imports)
FORK = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def make_loader(batches: Iterable[list[Item]], prep: Preprocess, workers: int, pin: bool,
                device_decode: bool = False, prefetch: int = PREFETCH) -> Any:
    """A DataLoader over `batches` (a re-iterable of Item lists, e.g. ChunkBatches): `workers` loader processes
    decode in parallel (0: decode in this process, for debugging and tiny query sets), each keeping up to `prefetch`
    batches ready (in shared memory: see `plan_shm`). `device_decode` (pass `Extractor.device_decode`: `--decode gpu`
    on a CUDA device) hands plain JPEGs over as bytes: the consumer must then use `Extractor.batch_to_device(batch)`,
    which decodes them."""
    from torch.utils.data import DataLoader

    kwargs: dict[str, Any] = {}
    if workers > 0:
        # fork, explicitly: a pool worker (spawned) would otherwise spawn its loaders too (the start method a spawned
        # process inherits), each importing torch again (seconds, ~0.4 GB each: 16 loaders x 8 GPUs), and a spawned
        # loader whose worker dies while it starts up never notices (torch's watchdog took pid 1 as its parent)
        kwargs = dict(prefetch_factor=max(1, prefetch), worker_init_fn=_loader_init, multiprocessing_context=FORK,
                      timeout=max(120.0, prep.timeout * 8 + 60.0))
    dataset: Any = DecodeDataset(prep, device_decode)  # a map-style dataset indexed by Items (torch's type: ints)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                      num_workers=workers, pin_memory=pin, **kwargs)


def decodes_on_device(prep: Preprocess, device: str) -> bool:
    """Whether JPEGs go to `device` as bytes (`--decode gpu` on a CUDA device); elsewhere `gpu` decodes as `fast`."""
    return prep.decode == "gpu" and device.startswith("cuda")


def default_loader_workers(devices_on_node: int) -> int:
    """Decode processes per device: the usable CPUs (affinity mask and cgroup quota) left after one per model worker,
    shared across devices, at least 1 and at most MAX_LOADERS_PER_DEVICE."""
    return loader_split(devices_on_node)[0]


def loader_split(devices_on_node: int, budget: CpuBudget | None = None) -> tuple[int, str]:
    """(loaders per device, a sentence saying how the CPUs were split) for the log."""
    budget = cpu_budget() if budget is None else budget
    n, d = budget.usable, max(1, devices_on_node)
    per = max(1, (n - d) // d) if n > d else 1
    capped = min(per, MAX_LOADERS_PER_DEVICE)
    note = f" (capped at {MAX_LOADERS_PER_DEVICE})" if capped < per else ""
    return capped, (f"{capped} loader processes per device{note} x {d} device(s), plus one model worker each, on "
                    f"{budget.describe()}")


@dataclass(frozen=True)
class ShmPlan:
    """How many loaders and prefetched batches per worker fit in /dev/shm, and what that needs."""

    loaders: int
    prefetch: int
    need: int  # bytes of /dev/shm the run may hold at once, all workers of this node together
    free: int  # bytes free in /dev/shm when the run started (-1: unknown, nothing was checked)
    changed: bool = False  # loaders or prefetch lowered to fit


def batch_bytes(prep: Preprocess, batch_size: int) -> int:
    """Bytes of one batch of decoded pixels (uint8 N x crop x crop x 3)."""
    return batch_size * prep.crop * prep.crop * 3


def shm_need(devices: int, loaders: int, prefetch: int, one_batch: int) -> int:
    """What a node's workers hold in shared memory at most: the batches each DataLoader keeps outstanding (loaders x
    prefetch: being built, queued, or arrived out of order) plus the one the worker is using (a used batch's pixels
    are released at once: see worker.ChunkBuffer)."""
    return devices * (loaders * prefetch + 1) * one_batch


def fit_shm(free: int, devices: int, loaders: int, prefetch: int, image_bytes: int, batch_size: int) -> ShmPlan:
    """The largest setting that fits SHM_HEADROOM of `free` bytes: fewer prefetched batches first, then fewer
    loaders; a UsageError saying what to do when not even one loader with one batch fits."""
    budget, one = int(free * SHM_HEADROOM), image_bytes * batch_size
    for p in range(prefetch, 0, -1):
        if shm_need(devices, loaders, p, one) <= budget:
            return ShmPlan(loaders, p, shm_need(devices, loaders, p, one), free, p != prefetch)
    for n in range(loaders - 1, 0, -1):
        if shm_need(devices, n, 1, one) <= budget:
            return ShmPlan(n, 1, shm_need(devices, n, 1, one), free, True)
    fits = budget // (shm_need(devices, 1, 1, 1) * image_bytes)
    raise UsageError(
        f"/dev/shm is too small: {_mb(free)} free, and {devices} worker(s) need {_mb(shm_need(devices, 1, 1, one))} "
        f"even with one loader process and one prefetched batch each (batches of {batch_size} images, {_mb(one)}, "
        "pass through shared memory). Give the container more shared memory (docker run --shm-size=16g ...; "
        "Kubernetes: an emptyDir with medium: Memory mounted at /dev/shm)"
        + (f", or lower --batch-size to {fits} or less" if fits >= 1 else "") + ".")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def shm_free(path: str = SHM_PATH) -> int:
    """Bytes free in `path` for this user (-1 when there is no such file system: nothing to check)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


def plan_shm(devices: int, loaders: int, prep: Preprocess, batch_size: int, path: str = SHM_PATH,
             prefetch: int = PREFETCH) -> ShmPlan:
    """Loaders and prefetch for this node's `devices` workers sized to the free shared memory at `path` (logged when
    lowered), or a UsageError naming `--shm-size` when even the smallest setting does not fit."""
    free = shm_free(path)
    if loaders == 0 or free < 0:  # decoding in the worker itself passes nothing through shared memory
        return ShmPlan(loaders, prefetch, 0, free)
    one = batch_bytes(prep, batch_size)
    plan = fit_shm(free, devices, loaders, prefetch, batch_bytes(prep, 1), batch_size)
    if plan.changed:
        log.warning("%s has %s free: %d loader process(es) x %d prefetched batch(es) of %s per worker (asked: %d x %d) "
                    "so that %d worker(s) fit (%s); for full speed give the container more (docker run --shm-size=16g)",
                    path, _mb(free), plan.loaders, plan.prefetch, _mb(one), loaders, prefetch, devices, _mb(plan.need))
    else:
        log.debug("%s: %s free, the run needs at most %s", path, _mb(free), _mb(plan.need))
    return plan

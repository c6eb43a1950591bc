"""Loader: chunk-bounded batches streamed from the list, decoded in loader processes, failures kept apart."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import make_images, write_list

from featshard.extract.decode import load_image
from featshard.store.inputs import open_input
from featshard.extract.loader import ChunkBatches, collate, default_loader_workers, make_loader
from featshard.extract.models import preprocess_for

PREP = preprocess_for("mobilenet_v2", "none")


@pytest.fixture(scope="module")
def listing(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("loader")
    images = make_images(root / "imgs", 6)
    (root / "notes.jpg").write_text("not an image")
    entries: list[Path | str] = [*images, "imgs/missing.jpg", root / "notes.jpg", images[0], images[1], images[2],
                                 images[3], images[4]]
    return write_list(root / "list.txt", entries), images


def rows_of(batches: ChunkBatches) -> list[list[int]]:
    return [[item.row for item in batch] for batch in batches]


def test_batches_never_straddle_chunks(listing: tuple[Path, list[Path]]) -> None:
    source = open_input(listing[0])
    chunks = [(0, 5), (5, 12), (12, 13)]
    got = rows_of(ChunkBatches(source, chunks, 4))
    assert got == [[0, 1, 2, 3], [4], [5, 6, 7, 8], [9, 10, 11], [12]]
    for batch in got:
        assert any(lo <= min(batch) and max(batch) < hi for lo, hi in chunks)


def test_finished_chunks_are_skipped_and_order_kept(listing: tuple[Path, list[Path]]) -> None:
    source = open_input(listing[0])
    assert rows_of(ChunkBatches(source, [(10, 13), (2, 4)], 2)) == [[2, 3], [10, 11], [12]]
    assert rows_of(ChunkBatches(source, [(0, 3), (6, 9)], 8, only_rows=[1, 7, 8])) == [[1], [7, 8]]
    assert rows_of(ChunkBatches(source, [], 8)) == []
    items = [item for batch in ChunkBatches(source, [(3, 6)], 2) for item in batch]
    assert [i.path for i in items] == [str(p) for p in open_items(listing[0])[3:6]]


def open_items(lst: Path) -> list[Path]:
    return [lst.parent / line for line in lst.read_text().splitlines()]


def test_loader_processes_decode_and_separate_failures(listing: tuple[Path, list[Path]]) -> None:
    source = open_input(listing[0])
    batches = list(make_loader(ChunkBatches(source, [(0, 7), (7, 13)], 4), PREP, workers=2, pin=False))
    assert [b.size for b in batches] == [4, 3, 4, 2]
    ok_rows = [r for b in batches for r in b.rows]
    failed = {r: why for b in batches for r, why in zip(b.failed_rows, b.failed_reasons)}
    assert ok_rows == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12]
    assert sorted(failed) == [6, 7] and failed[6].startswith("missing") and failed[7].startswith("not_image")
    first = batches[0]
    assert first.pixels.shape == (4, 224, 224, 3) and str(first.pixels.dtype) == "torch.uint8"
    assert first.encoded is None
    assert np.array_equal(first.pixels[2].numpy(), load_image(str(open_items(listing[0])[2]), PREP))
    assert all(len(b.rows) == len(b.names) == len(b.pixels) for b in batches)


def test_device_decode_hands_over_jpeg_bytes(listing: tuple[Path, list[Path]]) -> None:
    source = open_input(listing[0])
    prep = replace(PREP, decode="gpu")
    batches = list(make_loader(ChunkBatches(source, [(0, 8)], 8), prep, workers=0, pin=False, device_decode=True))
    (batch,) = batches
    assert batch.rows == [0, 1, 2, 3, 4, 5] and batch.failed_rows == [6, 7]
    kinds = ["jpg" if e is not None else "cpu" for e in batch.encoded]
    assert kinds == ["jpg", "cpu", "jpg", "cpu", "jpg", "cpu"]  # make_images alternates JPEG and PNG
    assert batch.pixels.shape[0] == 3
    (plain,) = list(make_loader(ChunkBatches(source, [(0, 8)], 8), prep, workers=0, pin=False))
    assert plain.encoded is None and plain.pixels.shape[0] == 6  # not asked for: the loaders decode everything


def test_collate_of_only_failures_is_empty() -> None:
    from featshard.store.inputs import Item

    batch = collate([(Item(3, "a", "/x/a"), None, "missing: gone")])
    assert batch.rows == [] and batch.failed_rows == [3] and batch.pixels.shape[0] == 0 and batch.size == 1


def test_default_loader_workers_leaves_a_core_per_device() -> None:
    assert default_loader_workers(1) >= 1
    assert default_loader_workers(64) == 1


def test_tar_truncated_while_running_fails_its_remaining_rows(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """WebDataset input: the source opened (and its tars indexed) before the tar is cut, as the workers of a run
    hold it; a loader process reads the members by offset: the rows past the new end fail as truncated, in
    their batches, and the rows before it decode."""
    from helpers.tars import make_tars

    monkeypatch.setenv("FEATSHARD_CACHE_DIR", str(tmp_path / "cache"))
    tar = make_tars(tmp_path / "shards", [6])[0]
    source = open_input(tar)
    items = list(ChunkBatches(source, [(0, 6)], 6))[0]
    with open(tar, "r+b") as fh:
        fh.truncate(items[3].path.offset + 5)
    batches = list(make_loader(ChunkBatches(source, [(0, 3), (3, 6)], 2), PREP, workers=1, pin=False))
    assert sum((b.rows for b in batches), []) == [0, 1, 2]
    assert sum((b.failed_rows for b in batches), []) == [3, 4, 5]
    reasons = sum((b.failed_reasons for b in batches), [])
    assert all(r.startswith("truncated: the tar 00000.tar ends at byte") for r in reasons), reasons


def test_decode_one_hands_over_what_the_loaders_would(tmp_path: Path) -> None:
    """An upload's bytes take the loaders' path: JPEG bytes for a device decode (other formats decoded here), the
    crop otherwise; a bad upload is an ImageFailure, as a bad file is."""
    import io

    import pytest
    from PIL import Image

    from featshard.extract.decode import ImageFailure
    from featshard.extract.batch import Encoded
    from featshard.extract.loader import decode_one
    from featshard.extract.models import preprocess_for

    prep = preprocess_for("mobilenet_v2", "none")
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (320, 240), (200, 30, 10)).save(jpeg, "JPEG")
    Image.new("RGB", (320, 240), (200, 30, 10)).save(png, "PNG")
    assert isinstance(decode_one(jpeg.getvalue(), prep, device_decode=True), Encoded)
    assert decode_one(png.getvalue(), prep, device_decode=True).shape == (224, 224, 3)  # type: ignore[union-attr]
    assert decode_one(jpeg.getvalue(), prep).shape == (224, 224, 3)  # type: ignore[union-attr]
    with pytest.raises(ImageFailure, match="not_image"):
        decode_one(b"not an image at all", prep, device_decode=True)


def test_loader_split_follows_the_cpu_budget_and_is_capped() -> None:
    from featshard.extract.loader import MAX_LOADERS_PER_DEVICE, loader_split
    from featshard.system import CpuBudget

    assert loader_split(8, CpuBudget(128, None))[0] == 15  # (128 - 8) // 8
    assert loader_split(8, CpuBudget(128, 32.0))[0] == 3  # a container limited to 32 CPUs
    assert loader_split(1, CpuBudget(256, None))[0] == MAX_LOADERS_PER_DEVICE == 32
    n, text = loader_split(2, CpuBudget(2, None))
    assert n == 1 and "1 loader processes per device x 2 device(s)" in text and "2 usable CPUs" in text


def test_fit_shm_lowers_prefetch_then_loaders_then_refuses() -> None:
    from featshard.errors import UsageError
    from featshard.extract.loader import fit_shm, shm_need

    image = 224 * 224 * 3
    mib = 2**20
    plan = fit_shm(64 * 1024 * mib, 8, 15, 4, image, 128)  # a 64 GiB /dev/shm feeds 8 GPUs as asked
    assert (plan.loaders, plan.prefetch, plan.changed) == (15, 4, False)
    assert plan.need == shm_need(8, 15, 4, image * 128) == 8 * 61 * image * 128
    plan = fit_shm(64 * mib, 2, 2, 4, image, 32)  # 51 MiB usable: 2 x (2 x 4 + 1) x 4.6 MiB does not fit
    assert (plan.loaders, plan.prefetch, plan.changed) == (2, 2, True) and plan.need <= 0.8 * 64 * mib
    plan = fit_shm(64 * mib, 2, 6, 4, image, 64)  # the case: 6 loaders of 9.2 MiB batches
    assert (plan.loaders, plan.prefetch) == (1, 1)
    with pytest.raises(UsageError) as err:
        fit_shm(16 * mib, 2, 6, 4, image, 64)
    assert "--shm-size" in str(err.value) and "lower --batch-size to 22 or less" in str(err.value)


def test_batches_are_stacked_into_shared_memory_in_loader_processes(listing: tuple[Path, list[Path]]) -> None:
    source = open_input(listing[0])
    (batch,) = list(make_loader(ChunkBatches(source, [(0, 4)], 4), PREP, workers=1, pin=False))
    assert batch.pixels.is_shared() and batch.pixels.shape == (4, 224, 224, 3)
    (local,) = list(make_loader(ChunkBatches(source, [(0, 4)], 4), PREP, workers=0, pin=False))
    assert not local.pixels.is_shared() and np.array_equal(local.pixels.numpy(), batch.pixels.numpy())

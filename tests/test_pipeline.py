"""The worker's batch loop (featshard.runner.pipeline): one batch submitted ahead, results taken one late, chunks
written by a background thread in order, a write error failing the loop with the writer's own error, progress
counting only rows on disk; and on a GPU, the model kept busy when data is ready."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from featshard.extract.extractor import Extractor
from featshard.extract.batch import Batch
from featshard.extract.models import ModelSpec, preprocess_for
from featshard.runner.pipeline import ChunkBuffer, ChunkWriter, ShardLoop
from featshard.store import shards
from featshard.store.progress import Progress, read_progress
from featshard.store.shards import WriteError, guarded_write

PREP = preprocess_for("mobilenet_v2", "none")


def progress_in(run: Path, rows: int, device: str = "cpu") -> Progress:
    (run / "shards").mkdir(parents=True, exist_ok=True)
    return Progress(str(run), "s", device, rows)


@pytest.fixture(scope="module")
def extractor() -> Extractor:
    return Extractor(ModelSpec("mobilenet_v2", "none", precision="fp32", graph="eager"), PREP, "cpu", batch_size=4)


def batches(rows: range, size: int, failed: set[int] = frozenset(), seed: int = 0) -> list[Batch]:
    """Loader-like batches of random pixels; rows in `failed` come as the loader's failures."""
    rng = np.random.default_rng(seed)
    out = []
    for lo in range(rows.start, rows.stop, size):
        ok = [r for r in range(lo, min(lo + size, rows.stop)) if r not in failed]
        bad = [r for r in range(lo, min(lo + size, rows.stop)) if r in failed]
        pixels = torch.from_numpy(rng.integers(0, 256, (len(ok), 224, 224, 3), dtype=np.uint8))
        out.append(Batch(ok, [f"r{r}" for r in ok], pixels, bad, [f"r{r}" for r in bad], ["missing: gone"] * len(bad)))
    return out


def writer_to(folder: Path, dim: int, fail_at: int | None = None) -> Any:
    """Writes chunk files as the worker does; the chunk starting at `fail_at` goes to a folder that does not exist
    (a real OSError, turned into a WriteError by guarded_write)."""
    def write(buf: ChunkBuffer) -> None:
        path = folder / ("missing-dir" if buf.lo == fail_at else "") / f"chunk-{buf.lo}-{buf.hi}.h5"
        guarded_write(path, lambda: shards.write_block(path, buf.to_block(dim, "float32"), {}, dim, "float32"))
    return write


class Spy:
    """The real extractor, with its submit and result calls recorded in order."""

    def __init__(self, ext: Extractor) -> None:
        self.ext, self.dim, self.calls = ext, ext.dim, []

    def submit(self, batch: Batch, stages: dict[str, float]) -> Any:
        first = batch.rows[0] if batch.rows else batch.failed_rows[0]
        self.calls.append(("submit", first))
        pending, calls = self.ext.submit(batch, stages), self.calls

        class Result:
            def result(self) -> np.ndarray:
                calls.append(("result", first))
                return pending.result()
        return Result()


def test_results_are_taken_one_batch_late_and_every_row_lands_in_its_chunk(tmp_path: Path,
                                                                            extractor: Extractor) -> None:
    data = batches(range(0, 12), 2, failed={3, 8})
    want = {r: f for b in batches(range(0, 12), 2, failed={3, 8}) for r, f in zip(b.rows, extractor.features(b))}
    spy = Spy(extractor)
    stages: dict[str, float] = {}
    progress = progress_in(tmp_path, 12)
    loop = ShardLoop(spy, [(0, 4), (4, 8), (8, 12)], writer_to(tmp_path, extractor.dim), stages, progress)
    assert loop.run(data) == 12
    firsts = [0, 2, 4, 6, 9, 10]  # row 8 failed: that batch starts at its ok row 9
    assert spy.calls[:3] == [("submit", 0), ("submit", 2), ("result", 0)]
    assert spy.calls[-3:] == [("submit", 10), ("result", 9), ("result", 10)]
    assert [r for kind, r in spy.calls if kind == "result"] == firsts
    for lo, hi in [(0, 4), (4, 8), (8, 12)]:
        block = shards.read_block(tmp_path / f"chunk-{lo}-{hi}.h5")
        assert sorted(block.rows.tolist() + block.failed_rows.tolist()) == list(range(lo, hi))
        assert block.failed_rows.tolist() == [r for r in (3, 8) if lo <= r < hi]
        np.testing.assert_allclose(block.features, np.stack([want[r] for r in block.rows]), atol=1e-5)
    assert read_progress(str(tmp_path), "s")["rows_done"] == 12
    assert {"wait_first", "wait_data", "h2d", "model", "write", "write_busy", "loop"} <= set(stages)
    assert stages["model"] > 0 and stages["loop"] >= stages["model"]


def test_progress_runs_at_most_the_chunk_being_written_ahead_of_disk(tmp_path: Path, extractor: Extractor) -> None:
    """Read back while each chunk is being written: the progress file counts that chunk at most (batches of a whole
    chunk: nothing is being filled), never the next one, whose handover waits for the writer."""
    progress = progress_in(tmp_path, 8)
    seen = []
    real = writer_to(tmp_path, extractor.dim)

    def write(buf: ChunkBuffer) -> None:
        time.sleep(0.3)  # the loop has long taken the next batch: it must wait to hand it over
        seen.append((buf.lo, buf.hi, read_progress(str(tmp_path), "s")["rows_done"]))
        real(buf)

    ShardLoop(extractor, [(0, 2), (2, 4), (4, 6), (6, 8)], write, {}, progress).run(batches(range(8), 2))
    assert [(lo, done <= hi) for lo, hi, done in seen] == [(0, True), (2, True), (4, True), (6, True)]
    assert read_progress(str(tmp_path), "s")["rows_done"] == 8


def test_a_write_error_fails_the_loop_and_nothing_after_it_is_written(tmp_path: Path, extractor: Extractor) -> None:
    progress = progress_in(tmp_path, 12)
    loop = ShardLoop(extractor, [(0, 4), (4, 8), (8, 12)], writer_to(tmp_path, extractor.dim, fail_at=4), {},
                     progress)
    with pytest.raises(WriteError, match="cannot write .*missing-dir.*rerun the same command"):
        loop.run(batches(range(12), 2))
    assert sorted(p.name for p in tmp_path.glob("chunk-*.h5")) == ["chunk-0-4.h5"]
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_writer_keeps_order_holds_one_chunk_and_abandon_writes_it(tmp_path: Path) -> None:
    written: list[int] = []

    def slow(buf: ChunkBuffer) -> None:
        time.sleep(0.1)
        written.append(buf.lo)

    writer = ChunkWriter(slow)
    t = time.monotonic()
    for lo in range(4):
        writer.put(ChunkBuffer(lo, lo + 1))
    assert time.monotonic() - t >= 0.25 and writer.blocked >= 0.25  # one chunk in flight: each put waited
    writer.abandon()
    assert written == [0, 1, 2, 3] and writer.busy >= 0.35
    assert list(writer.durable()) == [(0, 0)] * 4


def test_writer_error_is_raised_by_the_next_put_or_close() -> None:
    def fail(buf: ChunkBuffer) -> None:
        raise WriteError(f"cannot write chunk {buf.lo}")

    writer = ChunkWriter(fail)
    writer.put(ChunkBuffer(0, 1))
    deadline = time.monotonic() + 10
    while writer.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(WriteError, match="chunk 0"):
        writer.put(ChunkBuffer(1, 2))
    with pytest.raises(WriteError, match="chunk 0"):
        writer.close()


@pytest.mark.gpu
def test_the_model_is_busy_at_least_90_percent_when_data_is_ready(tmp_path: Path) -> None:
    """ResNet-50 bf16, batch 256, pinned batches always ready (no loader), chunks written by the writer: the
    model's device time over the steady-state wall time of the loop."""
    prep = preprocess_for("resnet50", "none")
    ext = Extractor(ModelSpec("resnet50", "none", precision="bf16", graph="eager"), prep, "cuda:0", batch_size=256)
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (256, 224, 224, 3), np.uint8)).pin_memory()

    def ready(n: int, start: int) -> Any:
        for i in range(n):
            rows = list(range(start + 256 * i, start + 256 * (i + 1)))
            yield Batch(rows, [""] * 256, pixels, [], [], [])

    for warm in ready(3, 0):  # cudnn tuned and the allocator warm before the measured loop
        ext.features(warm)
    stages: dict[str, float] = {}
    n = 40
    chunks = [(256 * i, 256 * (i + 2)) for i in range(0, n, 2)]
    ShardLoop(ext, chunks, writer_to(tmp_path, ext.dim), stages, progress_in(tmp_path, 256 * n, "cuda:0")
              ).run(ready(n, 0))
    busy = stages["model"] / stages["loop"]
    print(f"model busy {busy:.3f} of {stages['loop']:.2f} s: {stages}")
    assert busy >= 0.9, stages
    assert len(list(tmp_path.glob("chunk-*.h5"))) == n // 2
    assert read_progress(str(tmp_path), "s")["rows_done"] == 256 * n

"""The one unit of work, `extract_shard(spec) -> ShardResult`, run unchanged inline, in a Pool worker or a SLURM task.

It knows nothing of who launched it: the device comes from the spec and is pinned before CUDA starts; the model and
the loaders are built here, never pickled. Finished chunks are durable files; a rerun skips them. A `kill -9` at any
instant leaves only complete files plus, at worst, a torn `*.tmp-<pid>` file, which the next start removes. The batch
loop itself (submit one ahead, consume one late, chunks written by a background thread) is featshard.runner.pipeline.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable

from featshard.extract.extractor import Extractor
from featshard.extract.batch import Batch
from featshard.store import shards
from featshard.runner.devices import Device, device_identity, pin_device
from featshard.store.plan import chunk_ranges
from featshard.store.progress import Progress
from featshard.store.rundir import RunDir
from featshard.extract.loader import decodes_on_device
from featshard.extract.stream import BatchStream
from featshard.runner.pipeline import ChunkBuffer, ShardLoop
from featshard.runner.resume import clean_stale, durable_chunks
from featshard.runner.shardspec import STAGES, ShardFault, ShardResult, ShardSpec, Stopped, retryable
from featshard.store.shards import guarded_write

log = logging.getLogger("featshard.runner.worker")


class LazyExtractor:
    """Builds the model on first use: a shard with nothing left to do never loads it."""

    def __init__(self, spec: ShardSpec, device: str, stages: dict[str, float]) -> None:
        self.spec, self.device, self.stages = spec, device, stages
        self._ext: Extractor | None = None
        self.identity: dict[str, str] = {}  # device name and UUID, once the model is on it

    @property
    def graph(self) -> str:
        return "" if self._ext is None else str(getattr(self._ext, "graph", ""))

    @property
    def batch_size_used(self) -> int:
        return 0 if self._ext is None else int(self._ext.batch_size_used)

    def get(self) -> Extractor:
        if self._ext is None:
            from featshard.runner.runtime import tune_malloc

            tune_malloc()  # after the loaders forked (decode measured no faster tuned), before the model's first batch
            t = time.monotonic()
            self._ext = Extractor(self.spec.model, self.spec.prep, self.device, batch_size=self.spec.batch_size)
            self.identity = device_identity(self.device)
            log.info("%s: model %s on %s, %s, graph %s", self.spec.shard.name, self.spec.model.name, self.device,
                     self.spec.model.precision, self._ext.graph)
            self.stages["load_model"] += time.monotonic() - t
        return self._ext


def extract_shard(spec: ShardSpec) -> ShardResult:
    """Extract one shard to `shards/<name>.h5`, resuming from finished chunks."""
    from featshard.logs import setup_logging

    setup_logging()
    t0 = time.monotonic()
    device = pin_device(Device.parse(spec.shard.device), spec.cpu_threads)
    final = RunDir(spec.run_dir).shard(spec.shard.name)
    clean_stale(spec)
    if shards.is_complete(final) and not spec.retry_failed:
        return _done_result(spec, final, t0)
    progress = Progress(spec.run_dir, spec.shard.name, spec.shard.device, spec.shard.rows, retries=spec.retries,
                        attempt=spec.attempt)
    stages = dict.fromkeys(STAGES, 0.0)
    extractor = LazyExtractor(spec, device, stages)
    try:
        retried, recovered = _retry(spec, extractor, progress, stages) if spec.retry_failed else (0, 0)
        if shards.is_complete(final):  # --retry-failed on a finished shard
            resumed, processed = spec.shard.rows, 0
        else:
            resumed, processed = _run_chunks(spec, extractor, progress, stages)
    except BaseException as exc:
        stopped = isinstance(exc, (Stopped, SystemExit, KeyboardInterrupt))
        try:
            progress.set(force=True, state="stopped" if stopped else "failed", error=f"{type(exc).__name__}: {exc}")
        except OSError:  # the disk that failed the shard may fail this too: the shard's error matters more
            pass
        if not stopped and retryable(exc):
            uuid = extractor.identity.get("device_uuid")
            raise ShardFault(f"{spec.shard.name} on {spec.shard.device}{f' ({uuid})' if uuid else ''}: "
                             f"{type(exc).__name__}: {exc}") from exc
        raise
    progress.set(force=True, state="complete", stage="done")
    res = _done_result(spec, final, t0, resumed=resumed, processed=processed, stages=stages)
    res.retried_rows, res.recovered_rows = retried, recovered
    res.graph, res.batch_size_used = extractor.graph, extractor.batch_size_used
    res.device_uuid = extractor.identity.get("device_uuid", "")
    res.device_name = extractor.identity.get("device_name", "")
    log.info("%s done: %d ok, %d failed, %.1f images/s", spec.shard.name, res.ok, res.failed, res.images_per_s)
    return res


def _run_chunks(spec: ShardSpec, extractor: LazyExtractor, progress: Progress,
                stages: dict[str, float]) -> tuple[int, int]:
    resumed, processed = _extract_chunks(spec, extractor, progress, stages)
    progress.set(force=True, state="finalizing", stage="finalizing")
    t_write = time.monotonic()
    _finalize(spec)
    stages["write"] += time.monotonic() - t_write
    return resumed, processed


def _retry(spec: ShardSpec, extractor: LazyExtractor, progress: Progress,
           stages: dict[str, float]) -> tuple[int, int]:
    from featshard.runner.retryfailed import retry_failed

    progress.set(force=True, state="running", stage="retrying failed rows")
    return retry_failed(spec, extractor.get, stages, guarded_write)


def _extract_chunks(spec: ShardSpec, extractor: LazyExtractor, progress: Progress,
                    stages: dict[str, float]) -> tuple[int, int]:
    done, pending = durable_chunks(spec)
    resumed = sum(hi - lo for lo, hi in done)
    progress.set(force=True, rows_done=resumed, state="running" if pending else "finalizing",
                 stage="loading model" if pending else "finalizing")
    if not pending:
        return resumed, 0
    RunDir(spec.run_dir).parts(spec.shard.name).mkdir(parents=True, exist_ok=True)
    cuda = extractor.device.startswith("cuda")
    stream = BatchStream(spec.shard.name, spec.source, pending, spec.prep, spec.batch_size, spec.loader_workers, cuda,
                         device_decode=decodes_on_device(spec.prep, extractor.device), prefetch=spec.prefetch).start()
    ext = extractor.get()  # while the loaders decode the first batches
    progress.set(force=True, stage="extracting", **extractor.identity)
    return resumed, _consume(spec, ext, stream, pending, stages, progress)


def _consume(spec: ShardSpec, extractor: Extractor, loader: Iterable[Batch], pending: list[tuple[int, int]],
             stages: dict[str, float], progress: Progress) -> int:
    """The pending chunks through the overlapped loop (featshard.runner.pipeline); returns the rows processed."""
    loop = ShardLoop(extractor, pending, lambda buf: _write_chunk(spec, buf, extractor.dim), stages, progress,
                     name=spec.shard.name)
    return loop.run(loader)


def _write_chunk(spec: ShardSpec, buf: ChunkBuffer, dim: int) -> None:
    """One finished chunk as its file (atomically: it exists only when complete); runs on the writer thread."""
    attrs = provenance(spec, dim=dim, chunk_start=buf.lo, chunk_stop=buf.hi)
    path = RunDir(spec.run_dir).chunk(spec.shard.name, buf.lo, buf.hi)
    guarded_write(path, lambda: shards.write_block(path, buf.to_block(dim, spec.dtype), attrs, dim, spec.dtype))


def _finalize(spec: ShardSpec) -> None:
    """Concatenate the chunk files (in row order) into the shard file, atomically, then drop the parts."""
    chunks = chunk_ranges(spec.shard.start, spec.shard.stop, spec.chunk_size)
    parts = [str(RunDir(spec.run_dir).chunk(spec.shard.name, lo, hi)) for lo, hi in chunks]
    dim = int(shards.read_attrs(parts[0])["dim"]) if parts else int(spec.attrs.get("dim", 0))
    attrs = provenance(spec, dim=dim, shard_index=spec.shard.index, shard_count=spec.shard.count,
                 start=spec.shard.start, stop=spec.shard.stop, device=spec.shard.device)
    final = RunDir(spec.run_dir).shard(spec.shard.name)
    guarded_write(final, lambda: shards.concat_files(parts, str(final), attrs, dim, spec.dtype))
    shards.remove_tree(RunDir(spec.run_dir).parts(spec.shard.name))


def finished_result(spec: ShardSpec) -> ShardResult:
    """The result of a shard whose file is complete, read from the file (no model, no torch)."""
    return _done_result(spec, RunDir(spec.run_dir).shard(spec.shard.name), time.monotonic())


def provenance(spec: ShardSpec, **extra: Any) -> dict[str, Any]:
    """The attributes of a chunk or shard file: the run's, the versions this worker runs with, and `extra`."""
    from featshard.extract.models import library_versions

    return dict(spec.attrs, versions=library_versions(), **extra)


def _done_result(spec: ShardSpec, final: Path, t0: float, resumed: int | None = None, processed: int = 0,
                 stages: dict[str, float] | None = None) -> ShardResult:
    import h5py

    with h5py.File(final, "r") as h5:
        ok, failed = int(h5["rows"].shape[0]), int(h5["failed_rows"].shape[0])
    return ShardResult(
        shard=spec.shard.name, index=spec.shard.index, device=spec.shard.device, path=str(final),
        rows=spec.shard.rows, ok=ok, failed=failed,
        resumed_rows=spec.shard.rows if resumed is None else resumed, processed_rows=processed,
        seconds=time.monotonic() - t0, stages=stages or {},
    )

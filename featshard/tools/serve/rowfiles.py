"""Index ids -> the stored image files and vectors of the served runs, for `featshard serve`.

A request names an image only by its index id (an integer); this module turns that id into a path from the run's
own input list, never from request text. For every source run of the index (the served run and those added with
`featshard add`):

- `stored`: one bool per input row, True where the row's vector is in the shards (read from the shards' `rows` at
  startup: 1 byte per row, 10 MB for 10M rows). Only those rows are served; failed or unknown rows are not.
- the path table: the input list streamed ONCE with the same reader that defined the rows
  (`featshard.store.inputs.iter_items`), written as two files under the cache folder: `paths-<sha>.bin` (the paths'
  bytes back to back) and `offsets-<sha>.npy` (int64 start of each row's path, rows + 1 entries), both
  memory-mapped afterwards: a lookup reads a few bytes, the process keeps no per-row Python objects, and the files
  are reused by the next start (keyed by the input's sha256 from the manifest). While streaming, the rows are hashed
  exactly as `run` hashed them; an input list that changed since the run is refused (its rows would name other files).
- `vector(id)`: the stored vector of a row (shard position = stored rows before it in that shard), for neighbours.
"""
from __future__ import annotations

import hashlib
import logging
import mmap
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from featshard.errors import FeatshardError
from featshard.index.vectors import Source
from featshard.store.inputs import InputSource, iter_items, open_input, path_from_key, path_key, update_digest
from featshard.store.webdataset import TarMember
from featshard.store.manifest import load_manifest
from featshard.store.atomic import write_atomic
from featshard.store.rundir import RunDir

log = logging.getLogger("featshard.tools.serve.rowfiles")
ROWS_READ = 1 << 20  # rows per read of a shard's `rows` dataset at startup


@dataclass
class RunFiles:
    """One source run: its stored-row flags and (when its input list still matches) its path table."""

    source: Source
    name: str
    stored: np.ndarray
    offsets: np.ndarray | None = None
    blob: mmap.mmap | None = None
    unavailable: str = ""  # why paths cannot be served (input list gone or changed); "" when they can
    shard_starts: list[int] = field(default_factory=list)
    kind: str = "list"  # the input's kind: in a 'tar' input every path is a member (store.inputs.path_key)

    def path(self, row: int) -> str | TarMember | None:
        if self.offsets is None or self.blob is None:
            return None
        lo, hi = int(self.offsets[row]), int(self.offsets[row + 1])
        return path_from_key(self.blob[lo:hi].decode("utf-8", "surrogateescape"), self.kind)


class RowFiles:
    """Ids of the index -> (run, row), stored paths and stored vectors."""

    def __init__(self, runs: list[RunFiles]) -> None:
        self.runs = runs
        self.offsets = np.array([r.source.id_offset for r in runs], np.int64)

    @classmethod
    def build(cls, sources: Sequence[Source], cache_dir: Path) -> "RowFiles":
        names = run_names([s.run_dir for s in sources])
        return cls([_open_run(src, name, cache_dir) for src, name in zip(sources, names)])

    def locate(self, ident: int) -> tuple[RunFiles, int] | None:
        """(run, row) of a stored id; None for anything else (negative, past the end, a failed row, a gap)."""
        if ident < 0 or not len(self.runs):
            return None
        k = int(np.searchsorted(self.offsets, ident, side="right")) - 1
        if k < 0:
            return None
        run = self.runs[k]
        row = ident - run.source.id_offset
        if row >= run.source.rows or not bool(run.stored[row]):
            return None
        return run, row

    def vector(self, ident: int) -> np.ndarray | None:
        """The stored float32 vector of a stored id, read from its shard; None when the id is not stored."""
        import h5py

        found = self.locate(ident)
        if found is None:
            return None
        run, row = found
        j = int(np.searchsorted(run.shard_starts, row, side="right")) - 1
        ref = run.source.shards[j]
        pos = int(np.count_nonzero(run.stored[ref.start:row]))
        with h5py.File(ref.path, "r") as h5:
            if int(h5["rows"][pos]) != row:
                raise FeatshardError(f"{ref.path}: row {row} expected at position {pos}; the shard changed since "
                                     "the server started")
            return np.asarray(h5["features"][pos], np.float32)


def run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Short display names: each run folder's name, made unique with #N when two share one."""
    base = [Path(d).name or str(d) for d in run_dirs]
    return [b if base.count(b) == 1 else f"{b}#{i}" for i, b in enumerate(base)]


def stored_flags(src: Source) -> np.ndarray:
    """True for every row of `src` whose vector is in its shards."""
    import h5py

    flags = np.zeros(src.rows, np.bool_)
    for ref in src.shards:
        if not ref.path.is_file():
            continue
        with h5py.File(ref.path, "r") as h5:
            ds = h5["rows"]
            for lo in range(0, ds.shape[0], ROWS_READ):
                rows = ds[lo:lo + ROWS_READ]
                flags[rows[(rows >= 0) & (rows < src.rows)]] = True
    return flags


def _open_run(src: Source, name: str, cache_dir: Path) -> RunFiles:
    run = RunFiles(src, name, stored_flags(src), shard_starts=[s.start for s in src.shards])
    manifest = load_manifest(src.run_dir)
    want = manifest.get("input") or {}
    run.kind = str(want.get("kind", "list"))
    try:
        run.offsets, run.blob = path_table(str(want.get("path", "")), int(want.get("rows", src.rows)),
                                           str(want.get("sha256", "")), cache_dir)
    except (FeatshardError, OSError) as exc:
        run.unavailable = str(exc)
        log.warning("run %s: its images cannot be served (%s); search still works", src.run_dir, exc)
    return run


def path_table(input_path: str, rows: int, sha256: str, cache_dir: Path) -> tuple[np.ndarray, mmap.mmap]:
    """The memory-mapped (offsets, paths blob) of an input list, built once per input sha256 and cached."""
    key = hashlib.sha256(f"{input_path}\0{sha256}".encode("utf-8", "surrogateescape")).hexdigest()[:16]
    blob_path, offsets_path = cache_dir / f"paths-{key}.bin", cache_dir / f"offsets-{key}.npy"
    if not (blob_path.is_file() and offsets_path.is_file()):
        _write_table(input_path, rows, sha256, blob_path, offsets_path)
    offsets = np.load(offsets_path, mmap_mode="r")
    if offsets.shape != (rows + 1,):
        raise FeatshardError(f"{offsets_path} has {offsets.shape[0] - 1} rows, the run has {rows}; delete it")
    with open(blob_path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        blob = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else mmap.mmap(-1, 1)
    if int(offsets[-1]) != size:
        raise FeatshardError(f"{blob_path} is {size} bytes, its offsets say {int(offsets[-1])}; delete it")
    return offsets, blob


def _write_table(input_path: str, rows: int, sha256: str, blob_path: Path, offsets_path: Path) -> None:
    """Stream the input list once: paths into the blob, offsets into a .npy; both written atomically (the blob
    first), and only when the list still matches the run."""
    source = open_input(input_path)  # UsageError (a FeatshardError) when the list is gone
    blob_path.parent.mkdir(parents=True, exist_ok=True)
    size: list[int] = []
    write_atomic(offsets_path, lambda tmp_offsets: write_atomic(
        blob_path, lambda tmp_blob: size.append(_stream_table(source, input_path, rows, sha256, tmp_blob,
                                                              tmp_offsets))))
    log.info("path table of %s: %d rows, %d bytes (%s)", input_path, rows, size[0], blob_path)


def _stream_table(source: InputSource, input_path: str, rows: int, sha256: str, tmp_blob: str,
                  tmp_offsets: str) -> int:
    offsets = np.lib.format.open_memmap(tmp_offsets, mode="w+", dtype=np.int64, shape=(rows + 1,))
    digest, count, pos = hashlib.sha256(), 0, 0
    with open(tmp_blob, "wb") as out:
        for item in iter_items(source):
            if count >= rows:
                raise FeatshardError(f"the input list {input_path} now has more than the run's {rows} rows")
            raw = path_key(item.path).encode("utf-8", "surrogateescape")
            update_digest(digest, item)
            offsets[count] = pos
            out.write(raw)
            pos, count = pos + len(raw), count + 1
    offsets[count] = pos
    if count != rows or (sha256 and digest.hexdigest() != sha256):
        raise FeatshardError(f"the input list {input_path} changed since the run ({count} rows now, "
                             f"{rows} then, or other names/paths): its rows no longer name the run's images")
    offsets.flush()
    del offsets
    return pos


def default_cache_dir(run_dir: Path) -> Path:
    """RUN/serve-cache when it can be written, else a private temp folder (a read-only run still serves)."""
    cache = RunDir(run_dir).serve_cache
    try:
        cache.mkdir(exist_ok=True)
        if os.access(cache, os.W_OK):
            return cache
    except OSError:
        pass
    fallback = Path(tempfile.mkdtemp(prefix="featshard-serve-"))
    log.warning("%s is not writable; path tables go to %s", cache, fallback)
    return fallback

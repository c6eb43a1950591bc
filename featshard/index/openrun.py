"""`featshard.open_run(DIR)`: a run to read from Python, in bounded memory: its manifest, names by row, features in
batches, recorded failures, and its index."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from featshard.index.reader import LoadedIndex, load_index
from featshard.store import shards
from featshard.store.manifest import load_manifest
from featshard.store.plan import shard_name
from featshard.store.rundir import RunDir


@dataclass(frozen=True)
class Failure:
    row: int
    name: str
    reason: str  # "<class>: <message>", e.g. "truncated: image file is truncated"


class Run:
    """A run folder made by `featshard run`. Only finished shards are read (`complete` says whether all are)."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.dir = RunDir(run_dir)
        self.manifest: dict[str, Any] = load_manifest(run_dir)

    def __repr__(self) -> str:
        return f"Run({str(self.dir.root)!r}, rows={self.rows}, dim={self.dim}, model={self.model!r})"

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def dim(self) -> int:
        return int(self.manifest["model"]["dim"])

    @property
    def model(self) -> str:
        return str(self.manifest["model"]["name"])

    def _planned(self) -> list[tuple[Path, int, int]]:
        return [(self.dir.shard(shard_name(int(s["index"]), int(s["count"]))), int(s["start"]), int(s["stop"]))
                for s in self.manifest["plan"]]

    def shard_files(self) -> list[Path]:
        """The finished shard files, in row order."""
        return [path for path, lo, hi in self._planned() if hi > lo and shards.is_complete(path)]

    @property
    def complete(self) -> bool:
        return all(hi == lo or shards.is_complete(path) for path, lo, hi in self._planned())

    def iter_features(self, batch_rows: int = 65536) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
        """(rows, names, features) of every stored vector, `batch_rows` at a time, in row order."""
        for path in self.shard_files():
            with h5py.File(path, "r") as h5:
                n = int(h5["rows"].shape[0])
                for lo in range(0, n, batch_rows):
                    hi = min(n, lo + batch_rows)
                    yield h5["rows"][lo:hi], list(h5["names"].asstr()[lo:hi]), h5["features"][lo:hi]

    def failures(self) -> Iterator[Failure]:
        """Every row recorded as failed, with its reason, in row order."""
        for path in self.shard_files():
            with h5py.File(path, "r") as h5:
                rows, names = h5["failed_rows"][...], h5["failed_names"].asstr()[...]
                reasons = h5["failed_reasons"].asstr()[...]
            yield from (Failure(int(r), str(n), str(why)) for r, n, why in zip(rows, names, reasons))

    def names(self, rows: Any) -> list[str | None]:
        """The name of each input row (stored or failed); None for a row of an unfinished shard or out of range."""
        rows = np.asarray(rows, np.int64).ravel()
        out: list[str | None] = [None] * len(rows)
        for path, lo, hi in self._planned():
            pick = np.flatnonzero((rows >= lo) & (rows < hi))
            if not len(pick) or not shards.is_complete(path):
                continue
            order = pick[np.argsort(rows[pick], kind="stable")]
            found = shards.names_for_rows(path, rows[order])
            missing = [i for i, name in zip(order, found) if name is None]
            failed = shards.names_for_rows(path, rows[missing], failed=True) if missing else []
            for i, name in [*zip(order, found), *zip(missing, failed)]:
                out[int(i)] = name if name is not None else out[int(i)]
        return out

    def index(self) -> LoadedIndex:
        """The run's merged index (FeatshardError before `featshard merge`)."""
        return load_index(self.dir.root)

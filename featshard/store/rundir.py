"""`RunDir`: every path inside a run folder, computed in one place.

```
DIR/manifest.json                                   config, fingerprint, rows, plan
DIR/summary.json  (summary-node-0001.json, ...)     when `run` ends (one per node of a multi-node job)
DIR/shards/shard-00000-of-00008.h5                  finished shard
DIR/shards/shard-00000-of-00008.parts/chunk-000000000000-000000002048.h5   finished chunks while running
DIR/shards/shard-00000-of-00008.progress.json       live progress written by the worker
DIR/index/index.faiss, index.json, trained.faiss, index-<stamp>.ivfdata, parts/   merge output
DIR/locks/node-0000.lock                            run locks
DIR/slurm/extract.sbatch, merge.sbatch, jobs.json, logs/
DIR/serve-cache/                                    featshard serve's row -> path tables
```
"""
from __future__ import annotations

import os
import re
from pathlib import Path

CHUNK_NAME = re.compile(r"^chunk-(\d+)-(\d+)\.h5$")


class RunDir:
    """The paths of one run folder (nothing is created or read here)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def summary(self, rank: int = 0, nodes: int = 1) -> Path:
        return self.root / ("summary.json" if nodes == 1 else f"summary-node-{rank:04d}.json")

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    def shard(self, name: str) -> Path:
        return self.shards / f"{name}.h5"

    def parts(self, name: str) -> Path:
        return self.shards / f"{name}.parts"

    def chunk(self, name: str, lo: int, hi: int) -> Path:
        return self.parts(name) / f"chunk-{lo:012d}-{hi:012d}.h5"

    def progress(self, name: str) -> Path:
        return self.shards / f"{name}.progress.json"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    def lock(self, rank: int) -> Path:
        return self.locks / f"node-{rank:04d}.lock"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def index_file(self) -> Path:
        return self.index / "index.faiss"

    @property
    def index_meta(self) -> Path:
        return self.index / "index.json"

    @property
    def trained_index(self) -> Path:
        """The trained empty index of an `--on-disk` build, kept for `add`."""
        return self.index / "trained.faiss"

    @property
    def index_parts(self) -> Path:
        return self.index / "parts"

    @property
    def serve_cache(self) -> Path:
        """`featshard serve`'s row -> path tables."""
        return self.root / "serve-cache"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def slurm_jobs(self) -> Path:
        return self.slurm / "jobs.json"


def chunk_range(name: str) -> tuple[int, int] | None:
    """(lo, hi) of a chunk file name, None for any other name."""
    match = CHUNK_NAME.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None

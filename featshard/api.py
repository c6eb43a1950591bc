"""The Python API: one function per command, taking the command's options as keywords (the fields of its config
dataclass, the same names and defaults as the command line), or a ready config:
`featshard.run.with_config(RunConfig(...))`.

```python
import featshard

if __name__ == "__main__":       # needed in a script: the worker pool starts fresh interpreters that import it
    summary = featshard.run("list.txt", "RUN", gpus="0-7", model="resnet50")      # -> RunSummary
    info = featshard.merge("RUN", index_spec="auto")                              # -> IndexInfo
    hits = featshard.search("RUN", images=["q.jpg"], k=10)                        # -> list[QueryResult]
    run = featshard.open_run("RUN")   # .manifest, .names(rows), .iter_features(), .failures(), .index()
```
Functions raise `featshard.UsageError` (bad options or input) and `featshard.FeatshardError` (anything else the user
can act on; `RunIncomplete` carries the summary of a run whose shards did not all complete); they never exit.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from featshard.index.config import AddConfig, DedupConfig, MergeConfig, SearchConfig
from featshard.options import takes
from featshard.runner.config import DoctorConfig, RunConfig, StatusConfig, VerifyConfig
from featshard.tools.config import ExportConfig, ServeConfig

if TYPE_CHECKING:
    from typing import Any

    from featshard.index.dedup import DedupResult
    from featshard.index.openrun import Run
    from featshard.index.reader import IndexInfo
    from featshard.index.search import QueryResult
    from featshard.runner.doctor import DoctorReport
    from featshard.runner.report import RunSummary
    from featshard.runner.verifyreport import Report
    from featshard.tools.export import ExportResult


@takes(RunConfig)
def run(config: RunConfig) -> RunSummary:
    """Extract features of an image list into HDF5 shards, one shard per device (see `featshard run --help`)."""
    from featshard.runner.coordinator import run_job

    return run_job(config)


@takes(MergeConfig)
def merge(config: MergeConfig) -> IndexInfo:
    """Build one faiss index from a run's shards (ids are input row numbers)."""
    from featshard.index.merge import merge_run

    return merge_run(config)


@takes(SearchConfig)
def search(config: SearchConfig) -> list[QueryResult]:
    """The nearest stored images of each query image, extracted exactly as the stored vectors were."""
    from featshard.index.search import search_run

    return search_run(config)


def open_run(run_dir: str | os.PathLike[str]) -> Run:
    """A finished (or running) run to read from Python: manifest, names, features, failures, its index."""
    from featshard.index.openrun import Run

    return Run(run_dir)


@takes(VerifyConfig)
def verify(config: VerifyConfig) -> Report:
    """Check that every input row is accounted for exactly once (`report.ok`, `report.problems`)."""
    from featshard.runner.verify import verify_run

    return verify_run(config)


@takes(DedupConfig)
def dedup(config: DedupConfig) -> DedupResult:
    """Near-duplicate groups from the index (and byte-identical files with `exact=True`)."""
    from featshard.index.dedup import dedup_run

    return dedup_run(config)


@takes(AddConfig)
def add(config: AddConfig) -> IndexInfo:
    """Add another run's vectors (same model and config) to a run's index, without a rebuild."""
    from featshard.index.add import add_to_index

    return add_to_index(config)


@takes(ExportConfig)
def export(config: ExportConfig) -> ExportResult:
    """A finished run's vectors in clip-retrieval's layout (img_emb/*.npy + metadata/*.parquet) or as parquet."""
    from featshard.tools.export import export_run

    return export_run(config)


@takes(StatusConfig)
def status(config: StatusConfig) -> dict[str, Any]:
    """Per-shard progress of a run, live or after a crash (what `featshard status --json` prints)."""
    from featshard.runner.status import run_status

    return run_status(config)



@takes(ServeConfig)
def serve(config: ServeConfig) -> None:
    """Serve a run's index over HTTP (JSON API and a result gallery at `/`) until SIGINT/SIGTERM."""
    from featshard.tools.serve.command import serve as serve_forever

    serve_forever(config)


@takes(DoctorConfig)
def doctor(config: DoctorConfig) -> DoctorReport:
    """torch/CUDA/driver/GPU/faiss facts of this machine and what would go wrong on it (`report.ok`,
    `report.problems`)."""
    from featshard.runner.doctor import doctor as run_doctor

    return run_doctor()

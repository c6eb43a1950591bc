"""The options of the index commands (`merge`, `search`, `dedup`, `add`): one typed, validated dataclass each
(featshard.options: the API keywords and the CLI options come from these fields)."""
from __future__ import annotations

from dataclasses import dataclass

from featshard.errors import UsageError
from featshard.options import check_types, option

METRICS = ("ip", "l2")


def _recall(value: float | None) -> None:
    if value is not None and not 0 < value <= 1:
        raise UsageError("--target-recall must be in (0, 1]")


@dataclass
class MergeConfig:
    """`featshard merge`: build one faiss index from a run's shards."""

    run_dir: str = option(help="run directory (with manifest.json and shards/)", positional=True, metavar="DIR")
    index_spec: str = option("Flat", "faiss index_factory string, or 'auto' (default Flat)")
    metric: str = option("ip", "ip (default; cosine on normalised vectors) or l2", choices=METRICS)
    train_size: int | None = option(None, "training sample size (default from the spec)")
    max_index_memory: str | None = option(None, "memory budget for --index-spec auto, e.g. 4G (default: half the "
                                          "RAM)")
    on_disk: bool = option(False, "IVF only: inverted lists in an on-disk .ivfdata file, built one shard at a time "
                           "and memory-mapped by search")
    target_recall: float = option(0.95, "recall@10 to tune nprobe/efSearch for")
    gpu: bool | None = option(None, "train/add on GPUs (default: when a GPU faiss build sees one)")
    seed: int = option(0, "seed of the training and recall samples")

    def __post_init__(self) -> None:
        check_types(self)
        _recall(self.target_recall)
        if self.train_size is not None and self.train_size < 1:
            raise UsageError("--train-size must be >= 1")
        if self.max_index_memory is not None:
            from featshard.index.spec import parse_size

            parse_size(self.max_index_memory)

    @property
    def max_memory_bytes(self) -> int | None:
        from featshard.index.spec import parse_size

        return parse_size(self.max_index_memory) if self.max_index_memory else None


@dataclass
class SearchConfig:
    """`featshard search`: the nearest stored images of query images (`json`/`csv`: how the CLI prints them)."""

    run_dir: str = option(help="a run directory with a merged index", positional=True, metavar="DIR")
    images: list[str] = option([], "query image (repeatable)", flag="--image", metavar="PATH")
    input: str | None = option(None, "list/CSV/parquet/directory/tars of query images")
    k: int = option(10, "results per query (default 10)", flag="-k")
    batch_size: int = option(32, "queries per model batch")
    loader_workers: int = option(1, "decode processes")
    json: bool = option(False, "print JSON")
    csv: bool = option(False, "print CSV: query,rank,name,row,score")

    def __post_init__(self) -> None:
        check_types(self)
        if self.k < 1:
            raise UsageError("-k must be >= 1")
        if self.batch_size < 1 or self.loader_workers < 0:
            raise UsageError("--batch-size must be >= 1 and --loader-workers >= 0")
        if bool(self.images) == bool(self.input):
            raise UsageError("give query images with --image PATH (repeatable) or --input LIST, not both or neither")
        if self.json and self.csv:
            raise UsageError("--json and --csv exclude each other")


@dataclass
class DedupConfig:
    """`featshard dedup`: near-duplicate groups from the index, and byte-identical files with `exact`."""

    run_dir: str = option(help="run directory with a merged index", positional=True, metavar="DIR")
    threshold: float | None = option(None, "ip: similarity >= T (default 0.9); l2: squared distance <= T "
                                     "(default 0.2)")
    k: int = option(10, "neighbours searched per image (default 10)", flag="--k")
    exact: bool = option(False, "also group byte-identical files (sha256)")
    json: bool = option(False, "print JSON")
    csv: bool = option(False, "print CSV: kind,group,id,name,run_dir,row,score")
    out: str | None = option(None, "write the output here instead of stdout", metavar="FILE")

    def __post_init__(self) -> None:
        check_types(self)
        if self.k < 1:
            raise UsageError("--k must be >= 1")
        if self.json and self.csv:
            raise UsageError("--json and --csv exclude each other")


@dataclass
class AddConfig:
    """`featshard add`: add another run's vectors (same model and config) to an existing index."""

    run_dir: str = option(help="run directory whose index/ gets the vectors", positional=True, metavar="DIR")
    other: str = option(help="run directory whose vectors are added (same model/config)", flag="--from",
                        metavar="OTHER_RUN")
    target_recall: float | None = option(None, "recall@10 to re-tune for (default: the one the index was built "
                                         "with)")
    gpu: bool | None = option(None, "add on GPUs (default: when a GPU faiss build sees one)")

    def __post_init__(self) -> None:
        check_types(self)
        _recall(self.target_recall)

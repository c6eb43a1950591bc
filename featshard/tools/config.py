"""The options of the tools' commands (`bench`, `demo`, `export`): one typed, validated dataclass each
(featshard.options)."""
from __future__ import annotations

from dataclasses import dataclass

from featshard.errors import UsageError
from featshard.options import check_types, option


@dataclass
class BenchConfig:
    """`featshard bench`: decode, model and end-to-end throughput side by side, plus every fast path's fidelity."""

    out: str = option("bench-out", "output folder (data set, runs, bench.json, bench.png)")
    images: int = option(400, "images in the generated set (default 400)")
    models: str = option("mobilenet_v2,resnet50", "comma-separated torchvision model names")
    repeats: int = option(3, "repeats per measurement; the median is reported")
    seconds: float = option(4.0, "minimum seconds per model-only measurement")
    gpus: str | None = option(None, "devices for `run` (default: all GPUs, else cpu)")
    fidelity_images: int = option(64, "images for the fidelity check (0: skip)")
    compile: bool = option(True, "skip the torch.compile variants (slow first compile)", flag="--no-compile")
    index: int = option(0, "also run the index bench on N vectors", metavar="N")
    quick: bool = option(False, "tiny sizes for a smoke test: 16 images, 1 repeat, mobilenet_v2, no compile, "
                         "8 fidelity images")

    def __post_init__(self) -> None:
        check_types(self)
        if self.quick:
            self.images, self.repeats, self.seconds = min(self.images, 16), 1, 0.5
            self.models, self.compile, self.fidelity_images = "mobilenet_v2", False, min(self.fidelity_images, 8)
        if self.images < 1 or self.repeats < 1 or not self.model_list:
            raise UsageError("--images and --repeats must be >= 1 and --models must name a model")
        if self.fidelity_images < 0 or self.index < 0 or self.seconds <= 0:
            raise UsageError("--fidelity-images and --index must be >= 0, --seconds > 0")

    @property
    def model_list(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]


@dataclass
class DemoConfig:
    """`featshard demo`: build the embedded demo set and run run -> merge -> search on it."""

    out: str = option("demo-out", "demo folder: images/, list.txt, run/ (default: demo-out)")
    gpus: str | None = option(None, "devices as for `run` (default: all visible GPUs, else cpu)")
    query: list[str] = option([], "image name in OUT/images (or any image path) to search for; repeatable "
                              "(default: a crop and a recolour from the set)", metavar="NAME")
    limit: int | None = option(None, "use only the first N source photos (a quicker, smaller demo)", metavar="N")
    k: int = option(5, "matches to show per query (default: 5)", flag="-k")

    def __post_init__(self) -> None:
        check_types(self)
        if self.limit is not None and self.limit < 1:
            raise UsageError("--limit must be >= 1")
        if self.k < 1:
            raise UsageError("-k must be >= 1")


EXPORT_FORMATS = ("clip-retrieval", "parquet")


@dataclass
class ExportConfig:
    """`featshard export RUN --format clip-retrieval|parquet --out DIR`: a finished run's vectors in the layouts the
    ecosystem reads. clip-retrieval: per shard i, img_emb/img_emb_{i}.npy (N x D, dtype as stored) and
    metadata/metadata_{i}.parquet (image_path = the input name, row), row-aligned: what embedding-reader
    (parquet_npy) and autofaiss read. parquet: per shard i, embeddings_{i}.parquet with row, name and embedding (a
    fixed-size list). Streams shard by shard, writes each file atomically, refuses an unfinished run."""

    run_dir: str = option(help="a finished run directory", positional=True, metavar="RUN")
    format: str = option(help="clip-retrieval: img_emb/*.npy + metadata/*.parquet; parquet: row, name, embedding",
                         choices=EXPORT_FORMATS)
    out: str = option(help="folder to write (created)")
    overwrite: bool = option(False, "replace a previous export in --out")

    def __post_init__(self) -> None:
        check_types(self)
        if self.format not in EXPORT_FORMATS:
            raise UsageError(f"--format {self.format!r}: choose {' or '.join(EXPORT_FORMATS)}")


@dataclass
class ServeConfig:
    """`featshard serve`: an HTTP search service over a run's index, with a result gallery at `/`."""

    run_dir: str = option(help="a run directory with a merged index", positional=True, metavar="RUN")
    host: str = option("127.0.0.1", "address to bind (default 127.0.0.1: this machine only)")
    port: int = option(8000, "port (default 8000)")
    gpus: str | None = option(None, "one device: a GPU index (e.g. 0) or cpu (default: GPU 0, else cpu)")
    k: int = option(10, "results per query when a request gives no k (default 10)", flag="-k")
    max_upload_mb: float = option(20.0, "largest request body in MB (default 20)")
    max_batch: int = option(32, "queries per forward pass at most (default 32)")
    max_wait_ms: float = option(5.0, "how long a query waits for others to share its forward pass (default 5)")
    max_queue: int = option(32, "searches in progress at once; more get 503 (default 32)")
    timeout: float = option(30.0, "per-request limit in seconds (default 30)")
    thumb_cache_mb: int = option(64, "thumbnail cache in MB (default 64)")
    cache_dir: str | None = option(None, "where the row -> path tables go (default RUN/serve-cache)")

    def __post_init__(self) -> None:
        check_types(self)
        if not 0 < self.port < 65536:
            raise UsageError(f"--port {self.port}: expected 1-65535")
        for name in ("k", "max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_upload_mb <= 0 or self.timeout <= 0 or self.max_wait_ms < 0 or self.thumb_cache_mb < 0:
            raise UsageError("--max-upload-mb and --timeout must be > 0, --max-wait-ms and --thumb-cache-mb >= 0")

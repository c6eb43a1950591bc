"""`featshard export RUN --format clip-retrieval|parquet --out DIR`: a finished run's vectors in the layouts the
ecosystem reads (no peer reads HDF5).

- `clip-retrieval` (clip-retrieval's output, read by embedding-reader's `parquet_npy` format and by autofaiss): for
  shard i, `img_emb/img_emb_{i}.npy` (N x D, the dtype the shards store) and `metadata/metadata_{i}.parquet`
  (columns `image_path` = the input name, `row` = the input row), row-aligned.
- `parquet`: for shard i, `embeddings_{i}.parquet` with columns `row` (int64), `name` (string) and `embedding`
  (fixed_size_list of float32 or float16, length D); embedding-reader's `parquet` format reads the folder.

`export.json` records the run, model, fingerprint, dim, dtype and files. Only stored vectors are exported (failed
rows have none); a shard without vectors writes no files. Shard by shard, in slices of ~16 MB of vectors (memory:
one slice), each file written to a temporary name, fsynced and renamed. A run with a missing, incomplete or
foreign shard is refused (`featshard.index.vectors.check_source`), and so is an `--out` holding a previous export,
unless `--overwrite`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from featshard.errors import UsageError
from featshard.index.vectors import ShardRef, Source, batch_rows_for, check_source, read_rows, source_of
from featshard.store.atomic import write_atomic, write_json_atomic
from featshard.store.manifest import load_manifest
from featshard.tools.config import EXPORT_FORMATS as FORMATS
from featshard.tools.config import ExportConfig

log = logging.getLogger("featshard.tools.export")
EXPORT_BATCH = 65536  # rows per slice at most
EXPORT_BYTES = 16 << 20  # and about this many bytes of vectors (measured: RSS grows ~2.5x the slice's bytes)
_PATTERNS = ("img_emb/img_emb_*.npy", "metadata/metadata_*.parquet", "embeddings_*.parquet", "export.json")


@dataclass
class ExportResult:
    out: str
    format: str
    rows: int  # vectors exported
    dim: int
    dtype: str
    files: list[str] = field(default_factory=list)  # relative to `out`

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_run(config: ExportConfig) -> ExportResult:
    """`featshard export` / `featshard.export(...)`."""
    return export(config.run_dir, config.format, config.out, overwrite=config.overwrite)


def export(run_dir: str | os.PathLike[str], fmt: str, out: str | os.PathLike[str],
           overwrite: bool = False) -> ExportResult:
    """Write the run's stored vectors into `out` in format `fmt` (see the module doc)."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    src = check_source(source_of(run_dir))
    manifest = load_manifest(run_dir)
    dest = _prepare_out(Path(out), overwrite)
    if fmt == "clip-retrieval":
        for sub in ("img_emb", "metadata"):
            (dest / sub).mkdir(exist_ok=True)
    dtype = str(manifest["model"].get("dtype", "float32"))
    result = ExportResult(str(dest.resolve()), fmt, 0, src.dim, dtype)
    for i, (ref, count) in enumerate(zip(src.shards, src.counts)):
        if count == 0:
            continue
        parts = _clip_retrieval(ref, i, dest, dtype) if fmt == "clip-retrieval" else _parquet(ref, i, dest, dtype)
        result.files += parts
        result.rows += count
        log.info("%s: %d vectors -> %s", ref.name, count, ", ".join(parts))
    write_json_atomic(dest / "export.json", _meta(src, manifest, result))
    result.files.append("export.json")
    return result


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} exists and is not a folder")
    old = [p for pattern in _PATTERNS for p in out.glob(pattern)] if out.is_dir() else []
    if old and not overwrite:
        raise UsageError(f"--out {str(out)!r} holds a previous export ({len(old)} files, e.g. {old[0].name}); "
                         "pass --overwrite to replace it, or choose another folder")
    for path in old:
        path.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {str(out)!r}: cannot create it: {exc}") from exc
    return out


def _slices(ref: ShardRef, dim: int) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
    """(rows, names, features) of one shard, a slice of at most EXPORT_BATCH rows and ~EXPORT_BYTES at a time."""
    import h5py

    step = max(1, min(EXPORT_BATCH, EXPORT_BYTES // (4 * max(1, dim)), read_rows(ref.path, batch_rows_for(dim))))
    with h5py.File(ref.path, "r") as h5:
        n = int(h5["rows"].shape[0])
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            yield h5["rows"][lo:hi].astype(np.int64), h5["names"].asstr()[lo:hi].tolist(), h5["features"][lo:hi]


def _clip_retrieval(ref: ShardRef, i: int, dest: Path, dtype: str) -> list[str]:
    import pyarrow as pa

    npy, meta = f"img_emb/img_emb_{i}.npy", f"metadata/metadata_{i}.parquet"
    schema = pa.schema([("image_path", pa.string()), ("row", pa.int64())])

    def write_meta(meta_tmp: str) -> None:
        def write_npy(npy_tmp: str) -> None:
            with open(npy_tmp, "wb") as fh, _ParquetOut(meta_tmp, schema) as writer:
                _npy_header(fh, ref, dtype)
                for rows, names, feats in _slices(ref, _dim(ref)):
                    np.ascontiguousarray(feats, dtype=dtype).tofile(fh)
                    writer.write(pa.record_batch([pa.array(names, pa.string()), pa.array(rows, pa.int64())],
                                                 schema=schema))

        write_atomic(dest / npy, write_npy)  # one pass over the shard writes both files

    write_atomic(dest / meta, write_meta)
    return [npy, meta]


def _parquet(ref: ShardRef, i: int, dest: Path, dtype: str) -> list[str]:
    import pyarrow as pa

    name, dim = f"embeddings_{i}.parquet", _dim(ref)
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    schema = pa.schema([("row", pa.int64()), ("name", pa.string()), ("embedding", pa.list_(value_type, dim))])
    def write(tmp: str) -> None:
        with _ParquetOut(tmp, schema) as writer:
            for rows, names, feats in _slices(ref, dim):
                flat = pa.array(np.ascontiguousarray(feats, dtype=dtype).ravel(), value_type)
                writer.write(pa.record_batch([pa.array(rows, pa.int64()), pa.array(names, pa.string()),
                                              pa.FixedSizeListArray.from_arrays(flat, dim)], schema=schema))

    write_atomic(dest / name, write)
    return [name]


def _dim(ref: ShardRef) -> int:
    import h5py

    with h5py.File(ref.path, "r") as h5:
        return int(h5["features"].shape[1])


def _npy_header(fh: Any, ref: ShardRef, dtype: str) -> None:
    """The .npy header of the shard's whole (N, D) array; the data follows slice by slice."""
    import h5py

    with h5py.File(ref.path, "r") as h5:
        shape = tuple(int(x) for x in h5["features"].shape)
    np.lib.format.write_array_header_1_0(
        fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})


class _ParquetOut:
    """A pyarrow ParquetWriter closed (footer written) on exit."""

    def __init__(self, path: str, schema: Any) -> None:
        import pyarrow.parquet as pq

        self.writer = pq.ParquetWriter(path, schema, use_dictionary=False)  # unique names, float vectors

    def __enter__(self) -> Any:
        return self.writer

    def __exit__(self, *exc: object) -> None:
        self.writer.close()


def _meta(src: Source, manifest: dict[str, Any], result: ExportResult) -> dict[str, Any]:
    model = manifest.get("model", {})
    return {"run_dir": str(Path(src.run_dir).resolve()), "format": result.format, "fingerprint": src.fingerprint,
            "model": model.get("name"), "layer": model.get("layer"), "dim": result.dim, "dtype": result.dtype,
            "rows": int(manifest.get("rows", 0)), "exported": result.rows, "files": list(result.files)}

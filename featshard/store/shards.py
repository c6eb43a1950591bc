"""The HDF5 shard format: atomic chunk files while a shard runs, one self-describing shard file when it is done.

A finished shard `shards/shard-00000-of-00008.h5` holds the datasets
  names (utf-8 str), rows (int64, ascending), features (N x D),
  failed_rows (int64), failed_names (utf-8 str), failed_reasons (utf-8 str)
and attributes `complete`, `fingerprint`, `model`, `layer`, `dim`, `dtype`, ... (see run attrs).
While it runs, each finished chunk is its own small file of the same layout in `shard-....parts/`,
written to a temporary name, fsynced and renamed: a chunk file that exists is complete ("marker exists").
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import h5py
import numpy as np

from featshard.errors import FeatshardError
from featshard.store.atomic import write_atomic

STR = h5py.string_dtype("utf-8")
DATASETS = ("names", "rows", "features", "failed_rows", "failed_names", "failed_reasons")


@dataclass
class Block:
    """Rows of one chunk (or a whole shard) in memory: features for the ok rows, reasons for the failed ones."""

    rows: np.ndarray
    names: list[str]
    features: np.ndarray
    failed_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    failed_names: list[str] = field(default_factory=list)
    failed_reasons: list[str] = field(default_factory=list)


def clean_text(text: str) -> str:
    """HDF5 utf-8 strings cannot hold lone surrogates (undecodable file names); escape them visibly."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def create_h5(path: str | os.PathLike[str]) -> h5py.File:
    """A new HDF5 file for writing, without HDF5's file lock. A worker forks loader processes while its chunk
    writer thread may have a file open: the child inherits that descriptor, and with a lock the file stayed locked
    as long as the child lived (the chunk's read-back failed with errno 11, and the shard with it). featshard's
    files need no lock: each is written under a temporary name of its own process, published by rename and never
    opened for writing again."""
    return h5py.File(path, "w", locking=False)


def _to_attr(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    if value is None:
        return ""
    return value




def _create(h5: h5py.File, name: str, data: Any, dtype: Any, dim: int | None = None) -> None:
    if dim is None:
        h5.create_dataset(name, data=data, dtype=dtype, maxshape=(None,), chunks=True)
    else:
        rows = 1024 if len(data) == 0 else max(1, min(1024, len(data)))  # an empty, growing dataset: 1024 rows
        h5.create_dataset(name, data=data, dtype=dtype, maxshape=(None, dim), chunks=(rows, dim))


def write_block(path: str | os.PathLike[str], block: Block, attrs: dict[str, Any], dim: int, dtype: str) -> None:
    """Write one block as a complete file, atomically (featshard.store.atomic), read back before the rename."""
    feats = np.asarray(block.features, dtype=dtype).reshape(-1, dim)
    write_atomic(path, lambda tmp: _write_block(tmp, block, feats, attrs))


def _write_block(tmp: str, block: Block, feats: np.ndarray, attrs: dict[str, Any]) -> None:
    dim, dtype = feats.shape[1], feats.dtype
    with create_h5(tmp) as h5:
        _create(h5, "names", [clean_text(n) for n in block.names], STR)
        _create(h5, "rows", np.asarray(block.rows, np.int64), np.int64)
        _create(h5, "features", feats, dtype, dim)
        _create(h5, "failed_rows", np.asarray(block.failed_rows, np.int64), np.int64)
        _create(h5, "failed_names", [clean_text(n) for n in block.failed_names], STR)
        _create(h5, "failed_reasons", [clean_text(r) for r in block.failed_reasons], STR)
        for key, value in attrs.items():
            h5.attrs[key] = _to_attr(value)
        h5.attrs["complete"] = True
    _check_written(tmp, [(0, np.asarray(block.rows, np.int64), feats)])


def concat_files(parts: Sequence[str], final: str | os.PathLike[str], attrs: dict[str, Any], dim: int,
                 dtype: str) -> int:
    """Stream several block files into one shard file (one part in memory at a time), atomically; returns the
    number of feature rows."""
    total: list[int] = []
    write_atomic(final, lambda tmp: total.append(_concat(tmp, parts, attrs, dim, dtype)))
    return total[0]


def _concat(tmp: str, parts: Sequence[str], attrs: dict[str, Any], dim: int, dtype: str) -> int:
    total = 0
    with create_h5(tmp) as out:
        for key, value in attrs.items():
            out.attrs[key] = _to_attr(value)
        out.attrs["complete"] = False
        empty = Block(np.zeros(0, np.int64), [], np.zeros((0, dim), dtype))
        for name in DATASETS:
            data = getattr(empty, name)
            _create(out, name, data, out_dtype(name, dtype), dim if name == "features" else None)
        for part in parts:
            with h5py.File(part, "r") as src:
                for name in DATASETS:
                    append(out[name], src[name][...])
                total += src["rows"].shape[0]
        out.attrs["complete"] = True
    _check_parts(tmp, parts)
    return total


def _check_written(path: str, expected: list[tuple[int, np.ndarray, np.ndarray]]) -> None:
    """Read back what was written: HDF5 can swallow a failed flush (disk full), leaving zeros where data should be."""
    with h5py.File(path, "r") as h5:
        for lo, rows, feats in expected:
            hi = lo + len(rows)
            if not (np.array_equal(h5["rows"][lo:hi], rows) and np.array_equal(h5["features"][lo:hi], feats)):
                raise OSError(f"{path}: data read back differs from what was written (disk full or I/O error?)")


def _check_parts(path: str, parts: Sequence[str]) -> None:
    lo = 0
    for part in parts:
        with h5py.File(part, "r") as src:
            rows, feats = src["rows"][...], src["features"][...]
        _check_written(path, [(lo, rows, feats)])
        lo += len(rows)


def out_dtype(name: str, dtype: str) -> Any:
    return {"features": dtype, "rows": np.int64, "failed_rows": np.int64}.get(name, STR)


def append(ds: h5py.Dataset, data: Any) -> None:
    """Grow a resizable dataset by `data` along its first axis."""
    if len(data) == 0:
        return
    n = ds.shape[0]
    ds.resize(n + len(data), axis=0)
    ds[n:] = data


def read_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    with h5py.File(path, "r") as h5:
        return {k: _from_attr(v) for k, v in h5.attrs.items()}


def _from_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def read_block(path: str | os.PathLike[str]) -> Block:
    """Read a whole file (a chunk, or a small shard) into memory."""
    with h5py.File(path, "r") as h5:
        return Block(
            rows=h5["rows"][...],
            names=[s.decode() if isinstance(s, bytes) else s for s in h5["names"].asstr()[...]],
            features=h5["features"][...],
            failed_rows=h5["failed_rows"][...],
            failed_names=list(h5["failed_names"].asstr()[...]),
            failed_reasons=list(h5["failed_reasons"].asstr()[...]),
        )


def iter_features(path: str | os.PathLike[str], batch_rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (rows, features) from a shard in batches of at most batch_rows; never the whole shard at once."""
    with h5py.File(path, "r") as h5:
        n = h5["rows"].shape[0]
        for lo in range(0, n, batch_rows):
            hi = min(n, lo + batch_rows)
            yield h5["rows"][lo:hi], h5["features"][lo:hi]


def names_for_rows(path: str | os.PathLike[str], rows: np.ndarray, failed: bool = False) -> list[str | None]:
    """Look names up by row number in one shard (rows ascending there); None for a row not stored as a feature
    (with `failed=True`: among the failed rows instead)."""
    rows_key, names_key = ("failed_rows", "failed_names") if failed else ("rows", "names")
    with h5py.File(path, "r") as h5:
        stored = h5[rows_key]
        all_rows = stored[...] if stored.shape[0] <= 4_000_000 else None
        out: list[str | None] = []
        names = h5[names_key].asstr()
        for row in np.asarray(rows, np.int64):
            pos = int(np.searchsorted(all_rows, row)) if all_rows is not None else _bisect(stored, int(row))
            ok = pos < stored.shape[0] and int(stored[pos]) == int(row)
            out.append(names[pos] if ok else None)
        return out


def _bisect(ds: h5py.Dataset, row: int) -> int:
    lo, hi = 0, ds.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if int(ds[mid]) < row:
            lo = mid + 1
        else:
            hi = mid
    return lo


def is_complete(path: str | os.PathLike[str]) -> bool:
    """True for a file that exists, opens, and says complete (a torn or foreign file is not complete)."""
    try:
        with h5py.File(path, "r") as h5:
            return bool(h5.attrs.get("complete", False))
    except (OSError, KeyError):
        return False


def remove_tree(path: str | os.PathLike[str]) -> None:
    shutil.rmtree(path, ignore_errors=True)


class WriteError(FeatshardError):
    """A shard or chunk file could not be written (disk full, file too large, read-only filesystem)."""


def guarded_write(path: str | os.PathLike[str], write: Callable[[], Any]) -> Any:
    """Run `write` (which writes `path` through featshard.store.atomic, whose temp file is removed on failure); turn a
    failed write (h5py raises OSError or, when closing, RuntimeError) into a WriteError that says how to go on."""
    try:
        return write()
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "errno" not in str(exc):
            raise  # not a write error (e.g. torch reporting a dead loader process)
        raise WriteError(f"cannot write {path}: {_describe(exc)}. No shard was marked complete; free space (or fix "
                         "the file system), then rerun the same command: it resumes from the finished chunks") from None


def _describe(exc: BaseException) -> str:
    """The OS reason of a write error (h5py hides it in a long message as `errno = N`), then the first line."""
    import re

    code = getattr(exc, "errno", None) or next((int(m) for m in re.findall(r"errno = (\d+)", str(exc))), None)
    first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return f"{os.strerror(code)} ({first})" if code else f"{type(exc).__name__}: {first}"

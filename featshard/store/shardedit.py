"""Rewrite a finished shard or chunk file with the outcome of `run --retry-failed`, atomically.

A row that now succeeds moves from `failed_*` into `rows`/`names`/`features` at its place (`rows` stays ascending);
a row that still fails keeps its place with the new reason. The file is streamed: only the retried rows' features
are held in memory. A kill at any instant leaves the file either as it was or fully rewritten.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featshard.store import shards
from featshard.store.atomic import write_atomic

STREAM_ROWS = 16384  # rows of an existing file copied per step


def rewrite_file(path: Path, outcome: dict[int, np.ndarray | str]) -> int:
    """Rewrite one shard or chunk file with the retry outcome, atomically; returns rows moved to features."""
    moved: list[int] = []
    write_atomic(path, lambda tmp: moved.append(_rewrite(path, tmp, outcome)))
    return moved[0]


def _rewrite(path: Path, tmp: str, outcome: dict[int, np.ndarray | str]) -> int:
    with h5py.File(path, "r") as src:
        f_rows = src["failed_rows"][...].astype(np.int64)
        f_names = list(src["failed_names"].asstr()[...])
        f_reasons = list(src["failed_reasons"].asstr()[...])
        dim, dtype = int(src["features"].shape[1]), src["features"].dtype
        fixed = [i for i, r in enumerate(f_rows) if isinstance(outcome.get(int(r)), np.ndarray)]
        new = (f_rows[fixed], [f_names[i] for i in fixed],
               np.asarray([outcome[int(f_rows[i])] for i in fixed], dtype).reshape(-1, dim))
        moved = set(fixed)
        still = [i for i in range(len(f_rows)) if i not in moved]
        with shards.create_h5(tmp) as out:
            for key, value in src.attrs.items():
                out.attrs[key] = value
            out.attrs["complete"] = False
            _create_datasets(out, dim, dtype, int(src["rows"].shape[0]) + len(fixed))
            _merge_features(src, out, *new)
            shards.append(out["failed_rows"], f_rows[still])
            shards.append(out["failed_names"], [f_names[i] for i in still])
            shards.append(out["failed_reasons"], [_reason(outcome.get(int(f_rows[i])), f_reasons[i]) for i in still])
            out.attrs["complete"] = True
    return len(fixed)


def _reason(new: np.ndarray | str | None, old: str) -> str:
    return shards.clean_text(new) if isinstance(new, str) else old


def _create_datasets(out: h5py.File, dim: int, dtype: Any, total: int) -> None:
    for name in ("names", "failed_names", "failed_reasons"):
        out.create_dataset(name, shape=(0,), maxshape=(None,), dtype=shards.STR, chunks=True)
    for name in ("rows", "failed_rows"):
        out.create_dataset(name, shape=(0,), maxshape=(None,), dtype=np.int64, chunks=True)
    out.create_dataset("features", shape=(0, dim), maxshape=(None, dim), dtype=dtype,
                       chunks=(max(1, min(1024, total)), dim))


def _merge_features(src: h5py.File, out: h5py.File, new_rows: np.ndarray, new_names: list[str],
                    new_feats: np.ndarray) -> None:
    """Stream src's rows/names/features into out, inserting the new (sorted, disjoint) rows at their places."""
    n, j = int(src["rows"].shape[0]), 0
    for lo in range(0, n, STREAM_ROWS):
        hi = min(n, lo + STREAM_ROWS)
        rows = src["rows"][lo:hi].astype(np.int64)
        k = int(np.searchsorted(new_rows, rows[-1])) if hi < n else len(new_rows)
        _append_sorted(out, rows, list(src["names"].asstr()[lo:hi]), src["features"][lo:hi],
                       new_rows[j:k], new_names[j:k], new_feats[j:k])
        j = k
    if j < len(new_rows):  # src had no feature rows
        _append_sorted(out, new_rows[:0], [], new_feats[:0], new_rows[j:], new_names[j:], new_feats[j:])


def _append_sorted(out: h5py.File, rows: np.ndarray, names: list[str], feats: np.ndarray, add_rows: np.ndarray,
                   add_names: list[str], add_feats: np.ndarray) -> None:
    all_rows = np.concatenate([rows, add_rows])
    order = np.argsort(all_rows, kind="stable")
    all_names = [*names, *(shards.clean_text(x) for x in add_names)]
    shards.append(out["rows"], all_rows[order])
    shards.append(out["names"], [all_names[i] for i in order])
    shards.append(out["features"], np.concatenate([feats, add_feats.astype(feats.dtype)])[order])

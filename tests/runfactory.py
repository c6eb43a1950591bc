"""Synthetic run directories for tests: a manifest and finished shards written with the real shard writer."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from featshard.store.manifest import write_manifest
from featshard.store.plan import shard_name, split_rows
from featshard.store.shards import Block, write_block
from featshard.store.rundir import RunDir


def clustered(n: int, dim: int, seed: int, clusters: int = 50, spread: float = 0.15) -> np.ndarray:
    """Seeded unit vectors around `clusters` random centres (float32, n x dim)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return normalize(x)


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12))


def default_names(n: int) -> list[str]:
    return [f"img{row:05d}.jpg" for row in range(n)]


def make_run(run_dir: str | os.PathLike[str], vectors: np.ndarray, n_shards: int, fingerprint: str,
             failed_rows: Iterable[int] = (), names: Sequence[str] | None = None,
             fingerprint_fields: dict[str, Any] | None = None, input_path: str | None = None,
             dtype: str = "float32") -> dict[str, Any]:
    """A finished run of len(vectors) input rows: rows in failed_rows are recorded as failed, the rest stored.

    Returns the manifest (also written to run_dir/manifest.json).
    """
    run = Path(run_dir)
    RunDir(run).shards.mkdir(parents=True, exist_ok=True)
    vectors = np.asarray(vectors, np.float32)
    n, dim = vectors.shape
    names = list(names) if names is not None else default_names(n)
    failed = set(int(r) for r in failed_rows)
    fields = fingerprint_fields or {"model": "synthetic", "dim": dim, "input_sha256": fingerprint}
    plan = []
    for i, (lo, hi) in enumerate(split_rows(n, n_shards)):
        ok = [r for r in range(lo, hi) if r not in failed]
        bad = [r for r in range(lo, hi) if r in failed]
        block = Block(np.asarray(ok, np.int64), [names[r] for r in ok], vectors[ok].reshape(-1, dim),
                      np.asarray(bad, np.int64), [names[r] for r in bad], ["missing: no such file"] * len(bad))
        attrs = {"fingerprint": fingerprint, "dim": dim, "shard_index": i, "shard_count": n_shards,
                 "start": lo, "stop": hi, "model": "synthetic", "dtype": dtype}
        write_block(RunDir(run).shard(shard_name(i, n_shards)), block, attrs, dim, dtype)
        plan.append({"index": i, "count": n_shards, "start": lo, "stop": hi, "node": 0, "device": "cpu"})
    manifest = {
        "featshard_version": "test", "rows": n, "fingerprint": fingerprint, "fingerprint_fields": fields,
        "input": {"path": input_path or str(run / "input.txt"), "kind": "list", "rows": n, "sha256": fingerprint},
        "model": {"name": "synthetic", "dim": dim, "normalize": True, "dtype": dtype},
        "plan": plan,
    }
    write_manifest(run, manifest)
    return manifest

"""Read a featshard run with plain h5py and faiss — no featshard import needed.

    python examples/read_outputs.py RUN_DIR [-k 5]

Prints each shard's attributes and counts, streams the feature vectors in slices (as you would for millions of rows),
lists failed images with their reasons, then loads DIR/index/index.faiss, searches it with the first stored vector
and maps the returned ids (input row numbers) back to image names.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import faiss
import h5py
import numpy as np


def read_shards(run: Path, slice_rows: int = 4096) -> tuple[dict[int, str], np.ndarray | None]:
    """Row -> name for every stored image, and the first stored vector (float32)."""
    names: dict[int, str] = {}
    first: np.ndarray | None = None
    for path in sorted((run / "shards").glob("shard-*.h5")):
        with h5py.File(path, "r") as f:
            if not f.attrs["complete"]:
                raise SystemExit(f"{path} is not complete; the run did not finish")
            feats = f["features"]
            print(f"{path.name}: {feats.shape[0]} vectors of dim {f.attrs['dim']} ({feats.dtype}), "
                  f"model {f.attrs['model']}, layer {f.attrs['layer']}, {len(f['failed_rows'])} failed")
            rows = f["rows"][:]  # int64, ascending: the global ids
            names.update(zip(rows.tolist(), f["names"].asstr()[:]))
            for start in range(0, feats.shape[0], slice_rows):  # stream: one slice in memory at a time
                block = feats[start:start + slice_rows].astype(np.float32)
                if first is None and len(block):
                    first = block[0]
            for row, name, reason in zip(f["failed_rows"][:], f["failed_names"].asstr()[:],
                                         f["failed_reasons"].asstr()[:]):
                print(f"  failed row {row}: {name}: {reason}")
    return names, first


def load_index(run: Path) -> faiss.Index:
    """index.faiss, opened as merge left it, with the tuned search parameters from index.json applied."""
    meta = json.loads((run / "index" / "index.json").read_text())
    path = str(run / "index" / "index.faiss")
    # an --on-disk index keeps its inverted lists in a .ivfdata file next to it
    index = faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR) if meta.get("ivfdata") else faiss.read_index(path)
    for name, value in (meta.get("search_params") or {}).items():  # nprobe / efSearch for IVF / HNSW specs
        faiss.ParameterSpace().set_index_parameter(index, name, value)
    print(f"index: {meta.get('spec')} ({meta.get('metric')}), {index.ntotal} vectors")
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("-k", type=int, default=5)
    args = parser.parse_args()
    names, first = read_shards(args.run_dir)
    if first is None:
        raise SystemExit("no vectors stored")
    index = load_index(args.run_dir)
    scores, ids = index.search(first[None, :], args.k)
    print(f"nearest to {names[int(ids[0][0])]}:")
    for rank, (row, score) in enumerate(zip(ids[0], scores[0]), 1):
        if row >= 0:  # faiss pads with -1 when fewer than k are found
            print(f"  {rank}. {names[int(row)]}  row {row}  score {score:.4f}")


if __name__ == "__main__":
    main()

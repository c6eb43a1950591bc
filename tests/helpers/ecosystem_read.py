"""Read a `featshard export` folder with the real embedding-reader and index it with the real autofaiss; dump what
they saw for the test to compare with the run's shards. Runs in .venv-eco (`make eco-venv`: numpy 1), never in the
main venv.

usage: python ecosystem_read.py EXPORT_DIR clip-retrieval|parquet OUT_DIR [INDEX_KEY]
writes OUT_DIR/vectors.npy (float32, in reader order), OUT_DIR/meta.json ([[row, name], ...] in reader order),
OUT_DIR/found.npy (autofaiss top-1 id of each read vector), OUT_DIR/info.json.
"""
from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
from autofaiss import build_index
from embedding_reader import EmbeddingReader


def main(export: str, fmt: str, out: str, index_key: str | None) -> None:
    os.makedirs(out, exist_ok=True)
    if fmt == "clip-retrieval":
        emb_dir, name_col = os.path.join(export, "img_emb"), "image_path"
        reader = EmbeddingReader(emb_dir, file_format="parquet_npy", metadata_folder=os.path.join(export, "metadata"),
                                 meta_columns=[name_col, "row"])
        af = dict(embeddings=emb_dir, file_format="npy")
    else:
        emb_dir, name_col = export, "name"
        reader = EmbeddingReader(emb_dir, file_format="parquet", embedding_column="embedding",
                                 meta_columns=[name_col, "row"])
        af = dict(embeddings=emb_dir, file_format="parquet", embedding_column_name="embedding")
    vectors, meta = [], []
    for emb, frame in reader(batch_size=10_000, start=0, end=reader.count, show_progress=False):
        vectors.append(np.asarray(emb, np.float32))
        meta += [[int(r), str(n)] for r, n in zip(frame["row"], frame[name_col])]
    read = np.concatenate(vectors) if vectors else np.zeros((0, reader.dimension), np.float32)
    index, infos = build_index(**af, index_path=os.path.join(out, "knn.index"),
                               index_infos_path=os.path.join(out, "infos.json"), index_key=index_key,
                               max_index_memory_usage="1G", current_memory_available="2G", metric_type="ip",
                               save_on_disk=True, verbose=logging.ERROR)
    _, found = index.search(np.ascontiguousarray(read), 1)
    np.save(os.path.join(out, "vectors.npy"), read)
    np.save(os.path.join(out, "found.npy"), found[:, 0])
    with open(os.path.join(out, "meta.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh)
    with open(os.path.join(out, "info.json"), "w", encoding="utf-8") as fh:
        json.dump({"count": int(reader.count), "dimension": int(reader.dimension), "ntotal": int(index.ntotal),
                   "index_key": infos.get("index_key")}, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)

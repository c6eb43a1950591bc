"""Extract features of query images exactly as a run extracted its stored vectors: the run's model, weights, layer,
pooling, preprocessing, decode mode, precision and graph, through the same step (`Extractor.loader` +
`Extractor.features`), cast to the run's stored dtype. A query of a stored image gives its stored vector."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterator, Sequence

import numpy as np

from featshard.errors import FeatshardError
from featshard.extract.extractor import Extractor
from featshard.extract.models import ModelSpec
from featshard.extract.preprocess import Preprocess
from featshard.store.inputs import Item
from featshard.store.rundir import RunDir

log = logging.getLogger("featshard.query")


def spec_from_manifest(manifest: dict[str, Any], graph: str = "eager") -> tuple[ModelSpec, Preprocess, str]:
    m = manifest["model"]
    fields = {k: m[k] for k in ("name", "weights", "layer", "pool", "normalize", "precision", "seed")}
    spec = ModelSpec(**fields, graph=graph)
    if spec.weights not in ("DEFAULT", "none") and not os.path.isfile(spec.weights):
        raise FeatshardError(f"the run's weights file {spec.weights} is gone; queries need the same weights")
    return spec, Preprocess.from_dict(manifest["preprocess"]), m.get("dtype", "float32")


def run_graph(run_dir: str | os.PathLike[str] | None, manifest: dict[str, Any]) -> str:
    """How the run's workers ran the network (summary.json), else as asked; torch.compile's numbers are eager's
    (compiling for a few queries would take minutes)."""
    graph = str(manifest["model"].get("graph", "eager"))
    if run_dir is not None:
        try:
            graphs = json.loads(RunDir(run_dir).summary().read_text(encoding="utf-8")).get("graphs") or []
        except (OSError, ValueError):
            graphs = []
        graph = graphs[0] if len(graphs) == 1 else graph
    return "eager" if graph == "compile" else graph


def query_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


class QueryExtractor:
    """Builds the run's extractor once; `features(items)` yields (item, vector or None, failure reason)."""

    def __init__(self, manifest: dict[str, Any], batch_size: int = 32, workers: int = 1,
                 run_dir: str | os.PathLike[str] | None = None, device: str | None = None) -> None:
        spec, prep, self.dtype = spec_from_manifest(manifest, run_graph(run_dir, manifest))
        self.prep, self.batch_size, self.workers = prep, batch_size, workers
        self.extractor = Extractor(spec, prep, device or query_device(), batch_size=batch_size)
        if self.extractor.dim != int(manifest["model"]["dim"]):
            raise FeatshardError(f"query features have dim {self.extractor.dim}, "
                                 f"the run has {manifest['model']['dim']}")

    def stored_form(self, feats: np.ndarray) -> np.ndarray:
        """Vectors as the run stores them (its dtype), back in float32 for faiss."""
        return feats.astype(self.dtype).astype(np.float32)

    def features(self, items: Sequence[Item]) -> Iterator[tuple[Item, np.ndarray | None, str]]:
        batches = [list(items[i:i + self.batch_size]) for i in range(0, len(items), self.batch_size)]
        by_item = {item.row: item for item in items}
        for batch in self.extractor.loader(batches, min(self.workers, len(batches))):
            feats = self.stored_form(self.extractor.features(batch))
            by_row: dict[int, tuple[np.ndarray | None, str]] = {r: (f, "") for r, f in zip(batch.rows, feats)}
            by_row.update({r: (None, reason) for r, reason in zip(batch.failed_rows, batch.failed_reasons)})
            for row in sorted(by_row):
                vec, reason = by_row[row]
                yield by_item[row], vec, reason

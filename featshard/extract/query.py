"""Extract features of query images with exactly a run's recorded config (model, weights, layer, preprocessing)."""
from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Sequence

import numpy as np

from featshard.errors import FeatshardError
from featshard.store.inputs import Item
from featshard.extract.models import ModelSpec
from featshard.extract.preprocess import Preprocess

log = logging.getLogger("featshard.extract.query")


def spec_from_manifest(manifest: dict[str, Any]) -> tuple[ModelSpec, Preprocess, str]:
    m = manifest["model"]
    fields = {k: m[k] for k in ("name", "weights", "layer", "pool", "normalize", "precision", "seed")}
    spec = ModelSpec(**fields)
    if spec.weights not in ("DEFAULT", "none") and not os.path.isfile(spec.weights):
        raise FeatshardError(f"the run's weights file {spec.weights} is gone; queries need the same weights")
    return spec, Preprocess.from_dict(manifest["preprocess"]), m.get("dtype", "float32")


def query_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


class QueryExtractor:
    """Builds the run's extractor once; `features(items)` yields (item, vector or None, failure reason)."""

    def __init__(self, manifest: dict[str, Any], batch_size: int = 32, workers: int = 1) -> None:
        from featshard.extract.extractor import Extractor

        spec, prep, self.dtype = spec_from_manifest(manifest)
        self.prep, self.batch_size, self.workers = prep, batch_size, workers
        self.extractor = Extractor(spec, prep, query_device())
        if self.extractor.dim != int(manifest["model"]["dim"]):
            raise FeatshardError(f"query features have dim {self.extractor.dim}, "
                                 f"the run has {manifest['model']['dim']}")

    def features(self, items: Sequence[Item]) -> Iterator[tuple[Item, np.ndarray | None, str]]:
        from featshard.extract.loader import make_loader

        batches = [list(items[i:i + self.batch_size]) for i in range(0, len(items), self.batch_size)]
        workers = min(self.workers, len(batches))
        for batch in make_loader(batches, self.prep, workers, pin=False):
            by_row: dict[int, tuple[np.ndarray | None, str]] = {}
            if batch.rows:
                feats = self.extractor(batch.pixels).astype(self.dtype).astype(np.float32)
                by_row.update({r: (f, "") for r, f in zip(batch.rows, feats)})
            by_row.update({r: (None, reason) for r, reason in zip(batch.failed_rows, batch.failed_reasons)})
            for row in sorted(by_row):
                vec, reason = by_row[row]
                yield items[row], vec, reason

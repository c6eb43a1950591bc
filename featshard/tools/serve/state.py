"""What `featshard serve` holds while it runs: the run's model, its index and the stored files, loaded once.

`ServeState.load()` (in a background thread, so /healthz can answer 503 while it runs) builds the run's query
extractor (the run's model, weights, layer, preprocessing and precision: `featshard.extract.query.QueryExtractor`),
opens the index with its tuned search parameters (an --on-disk IVF memory-mapped) and the row -> file tables
(`featshard.tools.serve.rowfiles`). `embed` is the ONE place the model is called; `search_batch` is what the
batcher runs for a batch of uploads (one forward pass, one faiss search). Results name images like
`featshard search --json`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from featshard.errors import FeatshardError
from featshard.extract.decode import ImageFailure
from featshard.extract.batch import Encoded
from featshard.store.manifest import load_manifest
from featshard.tools.config import ServeConfig

log = logging.getLogger("featshard.tools.serve.state")
MAX_K = 1000  # results per query at most (k above ntotal or this is clamped)
DEDUP_K = 10
DEDUP_CACHE = 4  # thresholds whose groups are kept


@dataclass(frozen=True)
class Query:
    """One decoded upload waiting for the model: its crop (uint8 crop x crop x 3), or its JPEG bytes when the device
    decodes them, and how many results it wants."""

    sample: np.ndarray | Encoded
    k: int


class ServeState:
    def __init__(self, options: ServeConfig, device: str) -> None:
        self.options, self.device = options, device
        self.ready = False
        self.error = ""
        self.on_failure: Callable[[], None] = lambda: None
        self.forward_passes = 0
        self._dedup: OrderedDict[float, list[dict[str, Any]]] = OrderedDict()
        self._dedup_lock = threading.Lock()

    def load(self) -> None:
        """Model, index and row tables; sets `ready`, or `error` (and calls on_failure) when something is wrong."""
        from featshard.extract.query import QueryExtractor
        from featshard.index.reader import load_index
        from featshard.tools.serve.rowfiles import RowFiles, default_cache_dir

        started = time.monotonic()
        try:
            run = Path(self.options.run_dir)
            self.manifest = load_manifest(run)
            self.index = load_index(run)
            self.query = QueryExtractor(self.manifest, run_dir=run, device=self.device)
            self.prep, self.dtype = self.query.prep, self.query.dtype
            cache = Path(self.options.cache_dir) if self.options.cache_dir else default_cache_dir(run)
            self.files = RowFiles.build(self.index.sources, cache)
            self.run_of = {str(r.source.run_dir): r.name for r in self.files.runs}
            self.embed([np.zeros((self.prep.crop, self.prep.crop, 3), np.uint8)])  # warm-up: first call is slow
            self.forward_passes = 0
            self.ready = True
            log.info("ready in %.1f s: %s on %s, %d vectors (%s)", time.monotonic() - started,
                     self.manifest["model"]["name"], self.device, self.index.ntotal, self.index.meta.get("spec"))
        except Exception as exc:  # noqa: BLE001 - reported on /healthz and by `serve`'s exit
            self.error = str(exc) if isinstance(exc, FeatshardError) else f"{type(exc).__name__}: {exc}"
            log.error("cannot serve %s: %s", self.options.run_dir, self.error,
                      exc_info=not isinstance(exc, FeatshardError))
            self.on_failure()

    def decode(self, data: bytes) -> np.ndarray | Encoded:
        """An upload as the run's loaders hand an image over (its JPEG bytes for a device decode, else its crop);
        ImageFailure for bad input. Runs in the request's thread pool, not in the model thread."""
        from featshard.extract.loader import decode_one

        return decode_one(data, self.prep, self.query.extractor.device_decode)

    def embed(self, samples: list[np.ndarray | Encoded]) -> tuple[np.ndarray, list[int], dict[int, str]]:
        """THE model call of the server, through the run's extraction step (`Extractor.features`): decoded uploads ->
        (vectors cast to the run's stored dtype and back, so a stored image's query equals its stored vector; the
        positions they belong to; {position: reason} of those a device decode could not read)."""
        from featshard.extract.loader import collate
        from featshard.store.inputs import Item

        self.forward_passes += 1
        batch = collate([(Item(i, str(i), ""), sample, "") for i, sample in enumerate(samples)])
        vectors = self.query.stored_form(self.query.extractor.features(batch))
        return vectors, list(batch.rows), dict(zip(batch.failed_rows, batch.failed_reasons))

    def clamp_k(self, k: int) -> int:
        return max(1, min(int(k), MAX_K, max(1, self.index.ntotal)))

    def search_batch(self, queries: list[Query]) -> list[list[dict[str, Any]] | ImageFailure]:
        """One forward pass and one faiss search for a batch of uploads (run by the batcher's model thread); an
        upload the device could not decode gets its ImageFailure instead of results."""
        vectors, ok, failed = self.embed([q.sample for q in queries])
        out: list[list[dict[str, Any]] | ImageFailure] = [
            ImageFailure(*failed[i].partition(": ")[::2]) if i in failed else [] for i in range(len(queries))]
        if ok:
            scores, ids = self.index.search(vectors, max(queries[i].k for i in ok))
            for i, hits in zip(ok, self.hits(scores, ids, [queries[i].k for i in ok])):
                out[i] = hits
        return out

    def hits(self, scores: np.ndarray, ids: np.ndarray, ks: list[int]) -> list[list[dict[str, Any]]]:
        """Result dicts per query, named through the index's sources (as `featshard search --json` names them)."""
        flat = sorted({int(i) for i in ids.ravel() if i >= 0})
        names = dict(zip(flat, self.index.lookup(np.array(flat, np.int64)))) if flat else {}
        out = []
        for srow, irow, k in zip(scores, ids, ks):
            out.append([self._hit(int(i), float(s), names[int(i)]) for s, i in zip(srow[:k], irow[:k]) if i >= 0])
        return out

    def _hit(self, ident: int, score: float, where: tuple[str | None, str | None, int]) -> dict[str, Any]:
        name, run_dir, row = where
        return {"id": ident, "name": name, "row": int(row), "run": self.run_of.get(str(run_dir)),
                "score": round(score, 6)}

    def neighbors(self, ident: int, k: int) -> dict[str, Any] | None:
        """The k nearest of a stored image, searched with its stored vector (no re-extraction); None if not stored."""
        vector = self.files.vector(ident)
        if vector is None:
            return None
        scores, ids = self.index.search(vector[None, :], k)
        (query,) = self.hits(np.ones((1, 1), np.float32), np.array([[ident]], np.int64), [1])
        return {"query": {key: val for key, val in query[0].items() if key != "score"},
                "results": self.hits(scores, ids, [k])[0]}

    def dedup_groups(self, threshold: float) -> list[dict[str, Any]]:
        """Near-duplicate groups at `threshold` (computed once per threshold, one computation at a time)."""
        from featshard.index.dedup import near_groups

        with self._dedup_lock:
            if threshold in self._dedup:
                self._dedup.move_to_end(threshold)
                return self._dedup[threshold]
            started = time.monotonic()
            groups = [self._group(g) for g in near_groups(self.index, threshold, DEDUP_K)]
            log.info("dedup at %g: %d groups in %.1f s", threshold, len(groups), time.monotonic() - started)
            self._dedup[threshold] = groups
            while len(self._dedup) > DEDUP_CACHE:
                self._dedup.popitem(last=False)
            return groups

    def _group(self, group: dict[str, Any]) -> dict[str, Any]:
        members = [{"id": m["id"], "name": m["name"], "row": m["row"], "run": self.run_of.get(str(m["run_dir"])),
                    "score": m["score"]} for m in group["members"]]
        return {"group": group["group"], "size": group["size"], "score_min": group["score_min"],
                "score_max": group["score_max"], "members": members}

    def info(self) -> dict[str, Any]:
        meta, model = self.index.meta, self.manifest["model"]
        runs = [{"name": r.name, "id_offset": r.source.id_offset, "rows": r.source.rows,
                 "stored": int(np.count_nonzero(r.stored)), "images": not r.unavailable,
                 **({"images_unavailable": r.unavailable} if r.unavailable else {})} for r in self.files.runs]
        return {"model": model["name"], "layer": self.query.extractor.layer, "pool": model.get("pool"),
                "precision": model.get("precision"), "dtype": self.dtype, "dim": self.index.dim,
                "ntotal": self.index.ntotal, "spec": meta.get("spec"), "metric": meta.get("metric", "ip"),
                "recall_at_10": meta.get("recall_at_10"), "search_params": meta.get("search_params") or {},
                "on_disk": bool(meta.get("on_disk")), "runs": runs, "device": self.device,
                "forward_passes": self.forward_passes}

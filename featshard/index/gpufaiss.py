"""A BuildPlan (featshard.index.gpuplan) carried out with faiss.

`Placement.training(index)` attaches k-means assignment indexes: GPU flat indexes, or on the CPU a zero-padded flat
index for 1-3-dim PQ sub-vectors (faiss 1.15's flat search of 2-dim vectors is up to ~15x slower than of 4-dim ones
at some sizes, e.g. 42 ms vs 2.5 ms for 40k points against 256 centroids, and no slower elsewhere).
`Placement.adding(index)` assigns each batch to its lists with a GPU copy of a flat coarse quantizer and adds it on
the CPU. `Placement.knn` computes the tuning's ground truth. The CPU index is the only full copy. On a CPU-only plan
every step is plain faiss on the CPU, and the tests run the GPU steps' code with CPU indexes in place of GPU ones."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from featshard.errors import UsageError
from featshard.index.faissutil import is_exact, unwrap
from featshard.index.gpuplan import BuildPlan, Step, Workload, plan_build
from featshard.index.recall import Knn
from featshard.index.vectors import batch_rows_for

log = logging.getLogger("featshard.index.gpufaiss")

FAST_FLAT_DIM = 4
Adder = Callable[[np.ndarray, np.ndarray], None]


def use_gpu(requested: bool | None, num_gpus: int) -> bool:
    """GPU when asked (error if faiss sees none) or, by default, when a GPU faiss build sees a device."""
    if requested and num_gpus == 0:
        raise UsageError("--gpu given but faiss sees no GPU (install the GPU build: pip install .[gpu])")
    return num_gpus > 0 if requested is None else bool(requested)


def gpu_free_memory(requested: bool | None) -> list[int]:
    """Free bytes of each GPU faiss may use; [] without GPUs, with --no-gpu, or when they cannot be read."""
    import faiss

    if not use_gpu(requested, faiss.get_num_gpus()):
        return []
    try:
        import torch

        return [int(torch.cuda.mem_get_info(g)[0]) for g in range(faiss.get_num_gpus())]
    except (ImportError, RuntimeError, AssertionError) as exc:
        log.warning("cannot read the GPUs' free memory (%s): every step on the CPU", exc)
        return []


def workload_of(index: Any) -> Workload:
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    rows = batch_rows_for(index.d)
    if ivf is None:
        return Workload(index.d, trains=not index.is_trained, batch_rows=rows, exact=is_exact(index), preassign=False)
    flat = isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexFlat)
    return Workload(index.d, int(ivf.nlist), int(ivf.d), flat, not index.is_trained, rows,
                    preassign=takes_assignments(index))


def padded_flat(dim: int) -> Any:
    """An L2 flat index of `dim` < 4 dims that pads vectors with zeros to 4 (same distances; see the module doc)."""
    import faiss

    remap, flat = faiss.RemapDimensionsTransform(dim, FAST_FLAT_DIM, False), faiss.IndexFlatL2(FAST_FLAT_DIM)
    index = faiss.IndexPreTransform(remap, flat)
    index.referenced_objects = [remap, flat]  # the C++ index points at them
    return index


def product_quantizer(index: Any) -> Any | None:
    """The ProductQuantizer of a PQ / IVF-PQ index (fast-scan too), else None."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    return getattr(faiss.downcast_index(ivf) if ivf is not None else unwrap(index), "pq", None)


@contextlib.contextmanager
def assignment_indexes(index: Any, clustering: Any | None, pq_assign: Any | None) -> Iterator[None]:
    """Train with these indexes assigning points to centroids: the IVF's k-means (`clustering_index`) and the PQ
    sub-quantizers' (`assign_index`); None keeps faiss's own. Detached afterwards (they are not saved)."""
    import faiss

    ivf, pq = faiss.try_extract_index_ivf(index), product_quantizer(index)
    if ivf is not None and clustering is not None:
        ivf.clustering_index = clustering
    if pq is not None and pq_assign is not None:
        pq.assign_index = pq_assign
    try:
        yield
    finally:
        if ivf is not None:
            ivf.clustering_index = None
        if pq is not None:
            pq.assign_index = None


def takes_assignments(index: Any) -> bool:
    """An IVF index (under transforms at most: no id map, no refine step) whose add is "assign, then add_core":
    flat, PQ and SQ codes, not fast-scan's block lists."""
    import faiss

    top = faiss.downcast_index(index)
    while isinstance(top, faiss.IndexPreTransform):
        top = faiss.downcast_index(top.index)
    fast = isinstance(top, faiss.IndexIVFFastScan)
    return not fast and isinstance(top, (faiss.IndexIVFFlat, faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer))


def add_assigned(index: Any, ids: np.ndarray, vecs: np.ndarray, assigner: Any) -> None:
    """index.add_with_ids(vecs, ids), the coarse assignment computed by `assigner` (a copy of the coarse quantizer,
    e.g. on a GPU) and the codes on the CPU with the index's own quantizer (faiss's residuals call the quantizer
    once per vector: never a GPU round trip each)."""
    import faiss
    from faiss.contrib.ivf_tools import add_preassigned

    if not takes_assignments(index):
        raise ValueError("add_assigned needs an IVF flat/PQ/SQ index, under transforms at most")
    wrappers, top, x = [], faiss.downcast_index(index), vecs
    while isinstance(top, faiss.IndexPreTransform):
        for i in range(top.chain.size()):
            x = faiss.downcast_VectorTransform(top.chain.at(i)).apply(x)
        wrappers.append(top)
        top = faiss.downcast_index(top.index)
    x = np.ascontiguousarray(x, dtype=np.float32)
    add_preassigned(top, x, assigner.search(x, 1)[1].ravel(), np.ascontiguousarray(ids, np.int64))
    for wrapper in wrappers:
        wrapper.ntotal = top.ntotal


def _gpu_resources(cache: dict[int, Any], gpu: int) -> Any:
    import faiss

    if gpu not in cache:
        cache[gpu] = faiss.StandardGpuResources()
    return cache[gpu]


@dataclass
class Placement:
    """A BuildPlan and the GPU resources it uses (one StandardGpuResources per GPU, kept for the command)."""

    plan: BuildPlan = field(default_factory=BuildPlan)
    resources: dict[int, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def for_index(cls, index: Any, gpu: bool | None) -> "Placement":
        free = gpu_free_memory(gpu)
        plan = plan_build(workload_of(index), free)
        if free:
            log.info("GPU plan (free %s MiB): %s", [f // 2**20 for f in free], plan.meta())
        return cls(plan)

    def gpu_flat(self, dim: int, metric: int, step: Step) -> Any:
        """An empty flat index placed as `step` says (replicated or sharded, float32 or float16)."""
        import faiss

        options = faiss.GpuMultipleClonerOptions()
        options.shard, options.useFloat16 = step.shard, step.float16
        resources = [_gpu_resources(self.resources, g) for g in step.gpus]
        return faiss.index_cpu_to_gpu_multiple_py(resources, faiss.IndexFlat(dim, metric), options, step.gpus)

    def trainers(self, index: Any) -> tuple[Any | None, Any | None]:
        """(k-means index of the coarse quantizer, of the PQ sub-quantizers) for the train step; None: faiss's."""
        import faiss

        step, ivf, pq = self.plan.train, faiss.try_extract_index_ivf(index), product_quantizer(index)
        if step.device == "cpu":
            return None, padded_flat(pq.dsub) if pq is not None and pq.dsub < FAST_FLAT_DIM else None
        clustering = None
        if ivf is not None and ivf.quantizer_trains_alone in (0, 2):
            metric = ivf.metric_type if ivf.quantizer_trains_alone == 0 else faiss.METRIC_L2
            clustering = self.gpu_flat(ivf.d, metric, step)
        pq_assign = self.gpu_flat(pq.dsub, faiss.METRIC_L2, Step(step.device)) if pq is not None else None
        return clustering, pq_assign

    @contextlib.contextmanager
    def training(self, index: Any) -> Iterator[None]:
        clustering, pq_assign = self.trainers(index)
        with self.timed("train"), assignment_indexes(index, clustering, pq_assign):
            yield

    @contextlib.contextmanager
    def adding(self, index: Any) -> Iterator[Adder]:
        """A function adding (ids, vectors) to `index`: with the coarse assignment on the planned GPU, if any."""
        import faiss

        step = self.plan.add
        with self.timed("add"):
            if step.device == "cpu":
                yield lambda ids, vecs: index.add_with_ids(vecs, ids)
                return
            gpu = step.gpus[0]
            quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
            copy = faiss.index_cpu_to_gpu(_gpu_resources(self.resources, gpu), gpu, quantizer)
            yield lambda ids, vecs: add_assigned(index, ids, vecs, copy)

    def knn(self) -> Knn:
        """The exact k-NN function of the tune step: faiss.knn, or faiss.knn_gpu on the planned GPU."""
        import faiss

        step = self.plan.tune
        if step.device == "cpu":
            return faiss.knn
        gpu = step.gpus[0]
        res = _gpu_resources(self.resources, gpu)
        return lambda xq, xb, k, metric: faiss.knn_gpu(res, xq, xb, k, metric=metric, device=gpu)

    @contextlib.contextmanager
    def timed(self, step: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = round(self.seconds.get(step, 0.0) + time.perf_counter() - started, 3)

    def meta(self) -> dict[str, dict[str, Any]]:
        """index.json `steps`: where each step ran, why, and its seconds."""
        return {name: {**step, "seconds": self.seconds.get(name, 0.0)} for name, step in self.plan.meta().items()}

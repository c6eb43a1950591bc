"""Where `merge` and `add` run each step (train, add, tune), decided from sizes and each GPU's free memory alone
(`plan_build`: plain arithmetic, unit-tested with made-up memory figures); featshard.index.gpufaiss carries it out.

The whole index never goes to a GPU (faiss.index_cpu_to_all_gpus with default options replicated it on every GPU:
~8 KB per 2048-d IVF-Flat vector per GPU, and the add failed after training beyond ~9 M vectors). What does:
- train: the k-means of the coarse quantizer assigns the training sample with a GPU flat index of the k centroids
  (`IndexIVF.clustering_index`), replicated on every GPU that can hold it, else sharded across them, else in float16;
  the PQ sub-quantizers' k-means likewise (`ProductQuantizer.assign_index`). The sample stays in host memory (faiss
  pages it through its temporary memory). HNSW coarse quantizers included: only their k-means is on the GPU, the
  graph of the centroids is built on the CPU.
- add: a float32 copy of a flat coarse quantizer on the GPU with the most free memory assigns each batch to its
  lists (N vectors to k lists cost N x k x d: the add's work), then the CPU index encodes and stores it
  (`add_preassigned`); an HNSW quantizer stays on the CPU (its assignment is cheap), fast-scan indexes too.
- tune: the exact ground truth (1000 queries against every stored vector, streamed) on one GPU; the recall sweep
  searches the CPU index.
A GPU needs GPU_RESERVE free beyond its share (faiss's temporary memory, up to 1.5 GiB, and the CUDA context).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

GPU_RESERVE = 2 << 30


@dataclass(frozen=True)
class Workload:
    """What the plan depends on: the index's shape (see `workload_of` in featshard.index.gpufaiss)."""

    dim: int
    nlist: int = 0  # IVF lists; 0: not an IVF index
    ivf_dim: int = 0  # the dimension the IVF sees (after an OPQ/PCA transform)
    flat_quantizer: bool = True  # False: an HNSW (or other) coarse quantizer
    trains: bool = False  # the index needs training
    batch_rows: int = 65_536  # rows of one streamed batch (the ground truth's working set on a GPU)
    queries: int = 1000
    exact: bool = False  # a Flat index: recall 1 by construction, nothing to tune
    preassign: bool = True  # the IVF's add takes precomputed list numbers (flat/PQ/SQ codes; not fast-scan)


@dataclass(frozen=True)
class Step:
    """Where one step runs: "cpu" or "gpu:0" / "gpu:0,1"; how its index is spread; why."""

    device: str = "cpu"
    shard: bool = False
    float16: bool = False
    note: str = ""

    @property
    def gpus(self) -> list[int]:
        return [] if self.device == "cpu" else [int(g) for g in self.device[4:].split(",")]


@dataclass(frozen=True)
class BuildPlan:
    train: Step = field(default_factory=Step)
    add: Step = field(default_factory=Step)
    tune: Step = field(default_factory=Step)

    @property
    def uses_gpu(self) -> bool:
        return any(step.device != "cpu" for step in (self.train, self.add, self.tune))

    def meta(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(getattr(self, name)) for name in ("train", "add", "tune")}


def _mb(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def spread(need: int, free: Sequence[int]) -> Step | None:
    """A flat index of `need` bytes (float32) on GPUs with `free` bytes each: replicated on every GPU that holds it
    whole, else sharded over all, else the same in float16; None when nothing fits."""
    usable = {g: f - GPU_RESERVE for g, f in enumerate(free) if f > GPU_RESERVE}
    for float16, size in ((False, need), (True, (need + 1) // 2)):
        kind = "float16" if float16 else "float32"
        whole = [g for g, room in usable.items() if room >= size]
        if whole:
            return Step(_device(whole), float16=float16, note=f"{_mb(size)} {kind} on each of {len(whole)} GPU(s)")
        if len(usable) > 1 and all(room >= -(-size // len(usable)) for room in usable.values()):
            return Step(_device(list(usable)), shard=True, float16=float16,
                        note=f"{_mb(size)} {kind} sharded over {len(usable)} GPUs")
    return None


def best_gpu(need: int, free: Sequence[int]) -> int | None:
    """The GPU with the most free memory, if it holds `need` bytes beyond GPU_RESERVE."""
    if not free:
        return None
    g = max(range(len(free)), key=lambda i: free[i])
    return g if free[g] - GPU_RESERVE >= need else None


def _device(gpus: Sequence[int]) -> str:
    return "gpu:" + ",".join(str(g) for g in gpus)


def plan_train(work: Workload, free: Sequence[int]) -> Step:
    if not work.trains:
        return Step(note="nothing to train")
    if not work.nlist:
        return Step(note="not an IVF index: trained on the CPU")
    centroids = work.nlist * work.ivf_dim * 4
    step = spread(centroids, free)
    if step is None:
        return Step(note=f"the {work.nlist} centroids ({_mb(centroids)}) fit on no GPU" if free else "no GPU")
    return Step(step.device, step.shard, step.float16, f"k-means assignment: {step.note}")


def plan_add(work: Workload, free: Sequence[int]) -> Step:
    if not work.nlist:
        return Step(note="not an IVF index: added on the CPU")
    if not work.flat_quantizer:
        return Step(note="HNSW coarse quantizer: assignment is cheap on the CPU")
    if not work.preassign:
        return Step(note="fast-scan lists: added on the CPU")
    centroids = work.nlist * work.ivf_dim * 4
    g = best_gpu(centroids, free)
    if g is None:
        return Step(note=f"the {work.nlist} centroids ({_mb(centroids)}) fit on no GPU" if free else "no GPU")
    return Step(f"gpu:{g}", note=f"coarse assignment by a {_mb(centroids)} copy of the quantizer; codes on the CPU")


def plan_tune(work: Workload, free: Sequence[int]) -> Step:
    if work.exact:
        return Step(note="exact index: nothing to tune")
    need = (work.batch_rows + work.queries) * work.dim * 4
    g = best_gpu(need, free)
    if g is None:
        return Step(note="exact ground truth on the CPU" + ("" if free else ": no GPU"))
    return Step(f"gpu:{g}", note="exact ground truth on the GPU; recall sweep on the CPU index")


def plan_build(work: Workload, free: Sequence[int]) -> BuildPlan:
    """Each step's place, given the free bytes of each GPU faiss may use (empty: CPU only)."""
    return BuildPlan(plan_train(work, free), plan_add(work, free), plan_tune(work, free))

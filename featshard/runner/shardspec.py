"""What a shard's worker is given and gives back: `ShardSpec` (picklable: the one input of `extract_shard`),
`ShardResult`, the stage names it times, and the faults it raises (`Stopped`: a stop signal; `ShardFault`: a device
fault the coordinator retries)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from featshard.errors import FeatshardError
from featshard.extract.loader import PREFETCH
from featshard.extract.models import ModelSpec
from featshard.extract.preprocess import Preprocess
from featshard.store.inputs import InputSource
from featshard.store.plan import Shard

# seconds per stage, per shard (summary.json): see featshard.runner.pipeline; wait_first: the loaders starting
STAGES = ("load_model", "wait_first", "wait_data", "decode", "h2d", "model", "write", "write_busy", "loop")


class Stopped(FeatshardError):
    """The run was asked to stop (a signal): finished chunks stay on disk and the same command resumes."""


class ShardFault(FeatshardError):
    """A fault of the device while the shard ran (a CUDA error, out of memory): the coordinator retries the shard
    from its durable chunks, as for a worker that died, up to --max-retries."""


_CUDA_FAULTS = ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "NCCL error",
                "nvJPEG", "nvjpeg")


def retryable(exc: BaseException) -> bool:
    """Whether `exc` is a device fault worth a retry of the shard (torch.AcceleratorError and OutOfMemoryError, or a
    RuntimeError in CUDA's words) rather than a bug or bad input that would fail the same way again."""
    if type(exc).__name__ in ("AcceleratorError", "OutOfMemoryError"):
        return True
    return isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in _CUDA_FAULTS)


@dataclass(frozen=True)
class ShardSpec:
    run_dir: str
    shard: Shard
    source: InputSource
    model: ModelSpec
    prep: Preprocess
    dtype: str
    batch_size: int
    loader_workers: int
    chunk_size: int
    cpu_threads: int
    attrs: dict[str, Any] = field(default_factory=dict)  # provenance written into every file (fingerprint, ...)
    retries: int = 0  # how many times the coordinator restarted this shard after its worker died (progress file)
    retry_failed: bool = False  # re-process the rows recorded as failed in finished shards and chunks
    prefetch: int = PREFETCH  # batches each loader keeps ready (lowered to fit a small /dev/shm: loader.plan_shm)
    # this submission's token, written into the progress file: a backend that watches the worker's pid trusts only
    # the file of its own attempt (a killed run's file, seconds old, names a dead pid)
    attempt: str = ""


@dataclass
class ShardResult:
    shard: str
    index: int
    device: str
    path: str
    rows: int
    ok: int
    failed: int
    resumed_rows: int
    processed_rows: int
    seconds: float
    stages: dict[str, float]
    pid: int = field(default_factory=os.getpid)
    retried_rows: int = 0  # --retry-failed: failed rows processed again
    recovered_rows: int = 0  # ... of which now have a feature
    graph: str = ""  # how the network ran (featshard.extract.graph), "" when no model was needed
    device_uuid: str = ""  # the GPU this attempt ran on, as nvidia-smi names it ("" on CPU or without a model)
    device_name: str = ""
    batch_size_used: int = 0  # the model batch at the end (halved on each CUDA out-of-memory); 0: no model ran

    @property
    def images_per_s(self) -> float:
        return self.processed_rows / self.seconds if self.seconds > 0 else 0.0

"""worker: which faults of a shard are retried (device faults) and which fail it (bugs, bad setups)."""
from __future__ import annotations

import pickle

import torch

from featshard.runner.shardspec import ShardFault, retryable


def test_cuda_faults_and_out_of_memory_are_retryable() -> None:
    assert retryable(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert retryable(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    assert retryable(RuntimeError("CUDA error: unspecified launch failure\nCUDA kernel errors might be reported ..."))
    assert retryable(RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`"))
    assert not retryable(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x1280 and 512x10)"))
    assert not retryable(ValueError("CUDA error: not a RuntimeError"))
    assert not retryable(KeyError("model"))


def test_a_shard_fault_survives_the_trip_through_the_pool() -> None:
    back = pickle.loads(pickle.dumps(ShardFault("shard-00001-of-00008 on cuda:1 GPU-x: AcceleratorError: CUDA error")))
    assert isinstance(back, ShardFault) and "GPU-x" in str(back)

"""Backends behind one contract: `backend.submit(spec) -> handle`, `handle.result(timeout)`, `backend.close()`.

`inline` runs the unit of work in this process (tests, debugging); `pool` (featshard.runner.pool) runs it in a
spawn-context Pool, one process per device. The backend is chosen in exactly one place, `make_backend`; the
coordinator never branches on it.
"""
from __future__ import annotations

from typing import Callable

from featshard.errors import FeatshardError, UsageError
from featshard.runner.devices import Device
from featshard.runner.handles import Backend, LogRoute
from featshard.runner.pool import PoolBackend
from featshard.runner.shardspec import ShardResult, ShardSpec
from featshard.runner.worker import extract_shard

BACKENDS = ("pool", "inline")


class InlineHandle:
    def __init__(self, spec: ShardSpec, fn: Callable[[ShardSpec], ShardResult]) -> None:
        self.spec, self._fn = spec, fn
        self._value: ShardResult | None = None

    def result(self, timeout: float | None = None) -> ShardResult:
        if self._value is None:
            self._value = self._fn(self.spec)
        return self._value


class InlineBackend:
    """Runs shards one after another in this process, lazily, when their result is asked for."""

    def __init__(self, fn: Callable[[ShardSpec], ShardResult] = extract_shard) -> None:
        self._fn = fn

    def submit(self, spec: ShardSpec) -> InlineHandle:
        return InlineHandle(spec, self._fn)

    def close(self) -> None:
        pass

    def terminate(self) -> None:
        pass


def check_backend(name: str, devices: list[Device]) -> None:
    """Refuse what a backend cannot do before anything is spent: `inline` runs shards in this process, which sees
    one GPU, the first visible (CUDA reads CUDA_VISIBLE_DEVICES once); it would otherwise run them all there."""
    gpus = [d for d in devices if d.kind == "cuda"]
    if name == "inline" and (len(gpus) > 1 or any(d.index != 0 for d in gpus)):
        raise UsageError(f"--backend inline runs in this process, on one GPU only, the first visible one; "
                         f"--gpus gives {', '.join(str(d) for d in gpus)}: use --gpus 0 (CUDA_VISIBLE_DEVICES picks "
                         "which GPU that is) or the pool backend")


def make_backend(name: str, processes: int, stall_timeout: float = 0.0, logs: LogRoute | None = None) -> Backend:
    """The one place the backend is chosen. `stall_timeout` (s, 0: never): see `WorkerStalled`. `logs`: where pool
    workers send their log records (inline shards log in this process)."""
    if name == "inline":
        return InlineBackend()
    if name == "pool":
        return PoolBackend(processes, stall_timeout=stall_timeout, logs=logs)
    raise FeatshardError(f"unknown backend {name!r}: choose from {', '.join(BACKENDS)}")

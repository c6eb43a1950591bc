"""What every backend hands back and raises: `Handle` (`result(timeout)`), `Backend` (`submit`, `close`,
`terminate`), the faults the coordinator retries (`WorkerDied`, `WorkerStalled`), and `LogRoute` (where pool workers
send their log records)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from featshard.errors import FeatshardError
from featshard.runner.shardspec import ShardResult, ShardSpec


@dataclass(frozen=True)
class LogRoute:
    """Where a pool worker sends its log records (a `featshard.runner.logroute.LogListener`), and from what level."""

    address: str
    level: int


class WorkerDied(FeatshardError):
    """The process running a shard vanished (SIGKILL, OOM killer, segfault) before returning a result."""


class WorkerStalled(WorkerDied):
    """The process running a shard stopped updating its progress for longer than the stall timeout; it was stopped."""


class Handle(Protocol):
    spec: ShardSpec

    def result(self, timeout: float | None = None) -> ShardResult:
        """The shard's result; raises TimeoutError if not ready within `timeout`, or the worker's error."""


class Backend(Protocol):
    def submit(self, spec: ShardSpec) -> Handle: ...

    def close(self) -> None: ...

    def terminate(self) -> None: ...


class WorkersCannotStart(FeatshardError):
    """Every pool worker died while starting (typically: a script calls featshard.run without a main guard)."""

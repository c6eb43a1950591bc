"""Points and lanes on a device's timeline, the same code on every device.

On CUDA a `Mark` is a timing event recorded on a stream and a `Lane` is a stream (the device's current one, or a
side stream for input preparation, so that decoding batch k+1 overlaps the model on batch k); the host waits only
where it needs a result (`Mark.wait`). On a CPU the work is synchronous: a `Mark` is the host clock when it is made,
a `Lane` does nothing, and waiting is free. The extractor times its stages with marks (no synchronize per batch on a
GPU) and the CPU test suite runs every line of the overlapped path.
"""
from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch


class Mark:
    """A point on a lane's timeline: a recorded CUDA event (timed), or the host clock."""

    __slots__ = ("event", "at")

    def __init__(self, stream: Any = None) -> None:
        self.event: Any = None
        self.at = 0.0
        if stream is None:
            self.at = time.perf_counter()
        else:
            import torch

            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record(stream)

    def wait(self) -> None:
        """The host waits until the device has reached this point (no-op on a CPU)."""
        if self.event is not None:
            self.event.synchronize()

    def ready(self) -> bool:
        return self.event is None or bool(self.event.query())

    def seconds_to(self, later: "Mark") -> float:
        """Device time from this mark to `later` (both reached: wait on the later one first)."""
        if self.event is None:
            return max(0.0, later.at - self.at)
        return max(0.0, self.event.elapsed_time(later.event) / 1000.0)


class Lane:
    """Where work is queued: on CUDA the device's current stream (`side=False`) or a stream of its own (`side=True`);
    on a CPU the host itself (everything runs at once, in order)."""

    def __init__(self, device: torch.device, side: bool = False) -> None:
        import torch

        self.device = torch.device(device)
        self.stream: Any = None
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device) if side else torch.cuda.current_stream(self.device)

    @property
    def cuda(self) -> bool:
        return self.stream is not None

    @contextlib.contextmanager
    def active(self) -> Iterator["Lane"]:
        """Make this lane the current stream for the work queued inside the block."""
        if self.stream is None:
            yield self
            return
        import torch

        with torch.cuda.stream(self.stream):
            yield self

    def mark(self) -> Mark:
        return Mark(self.stream)

    def wait_for(self, mark: Mark) -> None:
        """Work queued on this lane from now on starts after `mark` (the device waits, not the host)."""
        if self.stream is not None and mark.event is not None:
            self.stream.wait_event(mark.event)

    def adopt(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` was made on another lane and is read on this one: its memory is not reused for anything else
        before this lane's queued work is done (the caching allocator's record_stream)."""
        if self.stream is not None and getattr(tensor, "is_cuda", False):
            tensor.record_stream(self.stream)
        return tensor

    def synchronize(self) -> None:
        """The host waits for everything queued on this lane."""
        if self.stream is not None:
            self.stream.synchronize()

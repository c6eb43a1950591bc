"""SIGINT, SIGTERM and SIGUSR2 during `run`: stop the workers, leave a state the same command resumes, exit 128+N."""
from __future__ import annotations

import logging
import signal
from typing import Any

from featshard.runner.shardspec import Stopped

log = logging.getLogger("featshard.run")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class Interrupted(Stopped):
    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}: finished chunks are on disk; "
                         "rerun the same command to resume")
        self.exit_code = 128 + signum


class StopSignals:
    """SIGINT, SIGTERM and SIGUSR2 become `Interrupted`: raised at once while no worker runs; while workers run
    (`polling`), recorded in `received` for the polling loop, which stops the workers first. Later signals are only
    recorded, so a second Ctrl-C cannot cut the clean-up short."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.polling = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        first = not self.received
        self.received.append(signum)
        if first:
            log.warning("received %s: stopping the workers; finished chunks stay on disk",
                        signal.Signals(signum).name)
            if not self.polling:
                raise Interrupted(signum)

    def __enter__(self) -> "StopSignals":
        self._previous = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

"""Live per-shard progress (`shards/<name>.progress.json`), rewritten atomically; read by `featshard status`."""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from featshard.store.atomic import write_json_atomic
from featshard.store.rundir import RunDir


def read_progress(run_dir: str | os.PathLike[str], shard_name: str) -> dict[str, Any] | None:
    try:
        return json.loads(RunDir(run_dir).progress(shard_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class Progress:
    """What one worker reports about its shard; `update` throttles writes to one per `every` seconds."""

    def __init__(self, run_dir: str, shard_name: str, device: str, rows_total: int, every: float = 2.0) -> None:
        self.path = RunDir(run_dir).progress(shard_name)
        self.every = every
        self.last_write = 0.0
        self.state: dict[str, Any] = {
            "shard": shard_name, "pid": os.getpid(), "host": socket.gethostname(), "device": device,
            "state": "starting", "rows_total": rows_total, "rows_done": 0, "ok": 0, "failed": 0,
            "images_per_s": 0.0, "started": time.time(), "updated": time.time(), "error": None,
        }
        self._run_start = time.monotonic()
        self._run_rows = 0
        self.set(force=True)  # the pid is on disk at once: the pool backend watches it

    def set(self, force: bool = False, **fields: Any) -> None:
        self.state.update(fields)
        now = time.time()
        if force or now - self.last_write >= self.every:
            self.state["updated"] = now
            write_json_atomic(self.path, self.state)
            self.last_write = now

    def add(self, ok: int, failed: int, force: bool = False) -> None:
        self._run_rows += ok + failed
        elapsed = max(1e-9, time.monotonic() - self._run_start)
        self.set(force=force, ok=self.state["ok"] + ok, failed=self.state["failed"] + failed,
                 rows_done=self.state["rows_done"] + ok + failed, images_per_s=round(self._run_rows / elapsed, 2))

    def restart_clock(self) -> None:
        self._run_start = time.monotonic()
        self._run_rows = 0

"""Live per-shard progress (`shards/<name>.progress.json`), rewritten atomically; read by `featshard status` and by
the coordinator's live display."""
from __future__ import annotations

import collections
import json
import os
import socket
import time
from typing import Any

from featshard.store.atomic import write_json_atomic
from featshard.store.rundir import RunDir
from featshard.system import pid_alive


def read_progress(run_dir: str | os.PathLike[str], shard_name: str) -> dict[str, Any] | None:
    try:
        return json.loads(RunDir(run_dir).progress(shard_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def mark_stopped(run_dir: str | os.PathLike[str], shard_name: str, why: str) -> bool:
    """A worker that was killed before it could say so (it did not unwind within the stop's grace period): its
    progress file, still "starting"/"running"/"finalizing" with a pid that is gone on this host, is rewritten as
    "stopped" with `why`. Returns whether it was."""
    progress = read_progress(run_dir, shard_name)
    if not progress or progress.get("state") not in ("starting", "running", "finalizing"):
        return False
    pid = progress.get("pid")
    if progress.get("host") != socket.gethostname() or not isinstance(pid, int) or pid_alive(pid):
        return False
    progress.update(state="stopped", error=why, updated=time.time())
    write_json_atomic(RunDir(run_dir).progress(shard_name), progress)
    return True


RATE_WINDOW = 60.0  # seconds: `images_per_s` is the rate over the last minute


class Progress:
    """What one worker reports about its shard; `update` throttles writes to one per `every` seconds.
    `retries`: how many times the coordinator restarted this shard after its worker died; `attempt`: the token of
    the submission this worker runs (the coordinator matches it before it trusts the pid)."""

    def __init__(self, run_dir: str, shard_name: str, device: str, rows_total: int, every: float = 2.0,
                 retries: int = 0, attempt: str = "") -> None:
        self.path = RunDir(run_dir).progress(shard_name)
        self.every = every
        self.last_write = 0.0
        self.state: dict[str, Any] = {
            "shard": shard_name, "pid": os.getpid(), "host": socket.gethostname(), "device": device,
            "state": "starting", "stage": "starting", "rows_total": rows_total, "rows_done": 0, "ok": 0,
            "failed": 0, "images_per_s": 0.0, "retries": retries, "started": time.time(), "updated": time.time(),
            "error": None, "attempt": attempt,
        }
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._run_rows = 0
        self.restart_clock()
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
        self.set(force=force, ok=self.state["ok"] + ok, failed=self.state["failed"] + failed,
                 rows_done=self.state["rows_done"] + ok + failed, images_per_s=round(self._rate(), 2))

    def _rate(self) -> float:
        """Rows per second over the last RATE_WINDOW seconds (since the clock started, when that is more recent)."""
        now = time.monotonic()
        self._samples.append((now, self._run_rows))
        while len(self._samples) > 2 and self._samples[1][0] <= now - RATE_WINDOW:
            self._samples.popleft()  # keep the last sample at or before the window's start
        t0, rows0 = self._samples[0]
        return (self._run_rows - rows0) / max(1e-9, now - t0)

    def restart_clock(self) -> None:
        self._run_rows = 0
        self._samples.clear()
        self._samples.append((time.monotonic(), 0))

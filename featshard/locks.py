"""A run lock per node (`DIR/locks/node-0000.lock` with pid and host): one live `run` per node and out dir.

A lock left by a dead process on this host is detected and taken over; a lock held by another host is refused
(we cannot see its processes) unless it is older than `stale_after` seconds without a refresh.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from featshard.errors import FeatshardError

log = logging.getLogger("featshard.locks")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:  # noqa: BLE001 - psutil missing or the process just went away
        return True


class RunLock:
    def __init__(self, run_dir: str, node_rank: int = 0, stale_after: float = 6 * 3600) -> None:
        self.path = Path(run_dir) / "locks" / f"node-{node_rank:04d}.lock"
        self.stale_after = stale_after
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _is_stale(self, info: dict[str, Any] | None) -> bool:
        if info is None:
            return True  # unreadable or half-written by a process that died while writing it
        if info.get("host") == self.me["host"]:
            return not _pid_alive(int(info.get("pid", -1)))
        return time.time() - float(info.get("since", 0)) > self.stale_after

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self.holder()
                if not self._is_stale(info):
                    raise FeatshardError(
                        f"{self.path.parent.parent} is in use by another run (pid {info['pid']} on {info['host']}, "
                        f"lock {self.path}); wait for it, or remove the lock if that process is gone") from None
                log.warning("taking over a stale lock %s left by %s", self.path, info)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.me, fh)
            return
        raise FeatshardError(f"could not take the lock {self.path}")

    def release(self) -> None:
        info = self.holder()
        if info and info.get("pid") == self.me["pid"] and info.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

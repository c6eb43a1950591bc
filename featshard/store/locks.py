"""A run lock per node (`DIR/locks/node-0000.lock` with pid and host): one live `run` per node and out dir.

The lock file is created with O_EXCL and holds {pid, host, since, refreshed, create_time}; while held, a heartbeat
thread rewrites it (atomically) every `heartbeat` seconds. A lock is stale, and is taken over, when
- its host is this host and its process is gone (or the pid now belongs to a younger process), or
- its host is another one (we cannot see its processes) and it has not been refreshed for `stale_after` seconds,
- or it cannot be read at all (a writer died half-way) and is older than a few seconds.
Taking over is serialised by a second O_EXCL file, so two newcomers never both win.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from types import TracebackType
from typing import Any

from featshard.errors import FeatshardError
from featshard.store.atomic import write_json_atomic
from featshard.store.rundir import RunDir
from featshard.system import create_time, pid_alive

log = logging.getLogger("featshard.store.locks")
TORN_GRACE = 5.0  # seconds an unreadable lock file is given to be finished by its writer


class RunLock:
    def __init__(self, run_dir: str, node_rank: int = 0, stale_after: float = 300.0,
                 heartbeat: float = 30.0) -> None:
        self.path = RunDir(run_dir).lock(node_rank)
        self.stale_after, self.heartbeat = stale_after, heartbeat
        pid = os.getpid()
        now = time.time()
        self.me = {"pid": pid, "host": socket.gethostname(), "since": now, "refreshed": now,
                   "create_time": create_time(pid)}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict[str, Any] | None:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def _is_stale(self, info: dict[str, Any] | None) -> bool:
        if info is None:  # unreadable: half-written by a process that died while writing it, or being written now
            try:
                return time.time() - self.path.stat().st_mtime > TORN_GRACE
            except OSError:
                return True
        if info.get("host") == self.me["host"]:
            return not pid_alive(int(info.get("pid", -1)), info.get("create_time"))
        last = float(info.get("refreshed") or info.get("since") or 0)
        return time.time() - last > self.stale_after

    def describe(self, info: dict[str, Any] | None) -> str:
        if not info:
            return "an unreadable lock"
        return f"pid {info.get('pid')} on {info.get('host')}"

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self.holder()
                if not self._is_stale(info):
                    raise FeatshardError(
                        f"{self.path.parent.parent} is in use by another run ({self.describe(info)}, lock "
                        f"{self.path}); wait for it to end, or stop it (it resumes later)") from None
                self._take_over(info)
                continue
            except OSError as exc:
                raise FeatshardError(f"cannot create the run lock {self.path}: {exc}") from None
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.me, fh)
            self._start_heartbeat()
            return
        raise FeatshardError(f"could not take the lock {self.path}: other runs keep taking it")

    def _take_over(self, info: dict[str, Any] | None) -> None:
        """Remove a stale lock, under a guard file so that only one newcomer removes it (and not a fresh one)."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > 60:  # its owner died while taking over
                    guard.unlink(missing_ok=True)
            except OSError:
                pass
            time.sleep(0.2)
            return
        try:
            os.close(fd)
            if self.holder() == info:  # still the lock we judged stale
                log.warning("taking over the stale lock %s left by %s (no longer running)", self.path,
                            self.describe(info))
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        if self.heartbeat <= 0:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="featshard-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            self.refresh()

    def refresh(self) -> None:
        """Rewrite the lock with a new `refreshed` time (atomically), if it is still ours."""
        if not self._mine(self.holder()):
            return
        self.me["refreshed"] = time.time()
        try:
            write_json_atomic(self.path, self.me)
        except OSError as exc:
            log.debug("cannot refresh %s: %s", self.path, exc)

    def _mine(self, info: dict[str, Any] | None) -> bool:
        return info is not None and info.get("pid") == self.me["pid"] and info.get("host") == self.me["host"]

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        if self._mine(self.holder()):
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

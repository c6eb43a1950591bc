"""Facts about this machine and its processes, shared by every layer: usable cores, whether a process lives, file
hashes. (Base layer: imports nothing of featshard but its errors.)"""
from __future__ import annotations

import hashlib
import os


def cores() -> int:
    """CPU cores this process may use (its affinity mask, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def create_time(pid: int) -> float | None:
    """Start time of process `pid` (to tell a reused pid), None when unknown."""
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # noqa: BLE001 - psutil missing, or no such process
        return None


def pid_alive(pid: int, started: float | None = None) -> bool:
    """True while `pid` runs and is not a zombie (and, when `started` is known, is still that process, not a newer
    one that reused the pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - started) < 1.0
    except Exception:  # noqa: BLE001 - psutil missing or the process just went away
        return True


def sha256_file(path: str | os.PathLike[str], block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in blocks (OSError if it cannot be read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()

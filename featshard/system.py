"""Facts about this machine and its processes, shared by every layer: usable cores, whether a process lives, file
hashes. (Base layer: imports nothing of featshard but its errors.)"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota (a container's `--cpus`,
    a SLURM or Kubernetes CPU limit). `usable` = min(affinity, ceil(quota))."""

    affinity: int
    quota: float | None  # CPUs' worth of time per period (cpu.max / cfs_quota_us), None: no quota

    @property
    def usable(self) -> int:
        if self.quota is None:
            return self.affinity
        return max(1, min(self.affinity, math.ceil(self.quota - 1e-9)))

    def describe(self) -> str:
        quota = "none" if self.quota is None else f"{self.quota:g} CPUs"
        return f"{self.usable} usable CPUs (affinity {self.affinity}, cgroup quota {quota})"


def cpu_budget(root: str | os.PathLike[str] = CGROUP_ROOT, proc_cgroup: str | None = None) -> CpuBudget:
    """The affinity mask and the tightest CPU quota of this process's cgroup and its ancestors. `root` and
    `proc_cgroup` (the text of /proc/self/cgroup) are parameters for tests."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text(encoding="utf-8")
        except OSError:
            proc_cgroup = ""
    quotas = [q for q in (_quota(d) for d in _cgroup_dirs(Path(root), proc_cgroup)) if q is not None]
    return CpuBudget(affinity, min(quotas) if quotas else None)


def _cgroup_dirs(root: Path, proc_cgroup: str) -> list[Path]:
    """The folders that may hold this process's CPU limits: its cgroup and every ancestor up to the root (v2 unified,
    and v1's cpu controller)."""
    dirs: list[Path] = []
    for line in proc_cgroup.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":
            bases = [root, root / "unified"]
        elif "cpu" in controllers.split(","):
            bases = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
        else:
            continue
        parts = [p for p in path.strip().split("/") if p]
        for base in bases:
            dirs += [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return list(dict.fromkeys(dirs))


def _quota(folder: Path) -> float | None:
    try:
        if (folder / "cpu.max").is_file():  # v2: "max 100000" or "200000 100000"
            quota, _, period = (folder / "cpu.max").read_text(encoding="utf-8").strip().partition(" ")
            return None if quota == "max" else int(quota) / int(period or 100000)
        if (folder / "cpu.cfs_quota_us").is_file():  # v1: -1 = no quota
            quota_us = int((folder / "cpu.cfs_quota_us").read_text(encoding="utf-8"))
            period_us = int((folder / "cpu.cfs_period_us").read_text(encoding="utf-8"))
            return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
    return None


def cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by its cgroup's CPU quota."""
    return cpu_budget().usable


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

"""system: the CPUs a process may use: its affinity mask capped by its cgroup's CPU quota (v2 cpu.max, v1 cfs)."""
from __future__ import annotations

import os
from pathlib import Path

from featshard.system import cores, cpu_budget

AFFINITY = len(os.sched_getaffinity(0))


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_of_the_process_or_an_ancestor(tmp_path: Path) -> None:
    write(tmp_path / "cpu.max", "max 100000\n")
    write(tmp_path / "kubepods" / "cpu.max", "150000 100000\n")  # a parent's limit holds for its children
    write(tmp_path / "kubepods" / "pod1" / "cpu.max", "max 100000\n")
    budget = cpu_budget(tmp_path, "0::/kubepods/pod1\n")
    assert budget.quota == 1.5 and budget.usable == min(AFFINITY, 2) and budget.affinity == AFFINITY
    assert "cgroup quota 1.5 CPUs" in budget.describe()


def test_cgroup_v1_quota_and_no_quota(tmp_path: Path) -> None:
    write(tmp_path / "cpu,cpuacct" / "slurm" / "job7" / "cpu.cfs_quota_us", "50000\n")
    write(tmp_path / "cpu,cpuacct" / "slurm" / "job7" / "cpu.cfs_period_us", "100000\n")
    assert cpu_budget(tmp_path, "4:cpu,cpuacct:/slurm/job7\n").usable == 1  # half a CPU still gets one
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cpu_budget(tmp_path, "3:cpu:/\n").quota is None
    assert cpu_budget(tmp_path / "nothing", "0::/\n").usable == AFFINITY


def test_cores_is_the_usable_count() -> None:
    assert 1 <= cores() <= AFFINITY and cores() == cpu_budget().usable

"""store/progress.py: a worker killed before it could unwind is marked stopped by the coordinator, and only then."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import os
from pathlib import Path

from featshard.store.progress import Progress, mark_stopped, read_progress
from featshard.store.rundir import RunDir


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def _progress_file(run: Path, **fields: object) -> None:
    path = RunDir(run).progress("shard-00000-of-00001")
    path.parent.mkdir(parents=True, exist_ok=True)
    base = {"shard": "shard-00000-of-00001", "host": socket.gethostname(), "state": "running", "stage": "extracting"}
    path.write_text(json.dumps({**base, **fields}))


def test_a_killed_workers_running_file_becomes_stopped(tmp_path: Path) -> None:
    _progress_file(tmp_path, pid=_dead_pid())
    assert mark_stopped(str(tmp_path), "shard-00000-of-00001", "killed after the grace period")
    prog = read_progress(tmp_path, "shard-00000-of-00001")
    assert prog is not None and prog["state"] == "stopped" and prog["error"] == "killed after the grace period"
    assert prog["stage"] == "extracting"  # where it was when it was killed


def test_a_live_worker_a_finished_shard_and_another_hosts_worker_are_left_alone(tmp_path: Path) -> None:
    for fields in ({"pid": os.getpid()}, {"pid": _dead_pid(), "state": "complete"},
                   {"pid": _dead_pid(), "state": "stopped"}, {"pid": _dead_pid(), "host": "another-node"}):
        _progress_file(tmp_path, **fields)
        assert not mark_stopped(str(tmp_path), "shard-00000-of-00001", "x"), fields
        assert read_progress(tmp_path, "shard-00000-of-00001") == {**{
            "shard": "shard-00000-of-00001", "host": socket.gethostname(), "state": "running",
            "stage": "extracting"}, **fields}
    assert not mark_stopped(str(tmp_path), "shard-00000-of-00099", "x")  # no file at all


def test_progress_records_its_attempt(tmp_path: Path) -> None:
    RunDir(tmp_path).shards.mkdir(parents=True)
    Progress(str(tmp_path), "shard-00000-of-00001", "cpu:0", 10, attempt="token")
    prog = read_progress(tmp_path, "shard-00000-of-00001")
    assert prog is not None and prog["attempt"] == "token" and prog["pid"] == os.getpid()

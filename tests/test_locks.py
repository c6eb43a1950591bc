"""The run lock: one live `run` per out dir and node; stale locks (dead pid, reused pid, silent other host, torn
file) are taken over; live ones are refused with pid and host. Through the CLI: a second real `run` is refused in
test_signals.py, and a run killed with SIGKILL leaves a stale lock that the rerun takes over in test_resume.py."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

from featshard.errors import FeatshardError
from featshard.store.locks import RunLock


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(run: Path, **info: object) -> Path:
    path = run / "locks" / "node-0000.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info))
    return path


def test_second_holder_is_refused_with_pid_and_host(tmp_path: Path) -> None:
    with RunLock(str(tmp_path)) as first:
        with pytest.raises(FeatshardError) as info:
            RunLock(str(tmp_path)).acquire()
        assert f"pid {os.getpid()} on {socket.gethostname()}" in str(info.value)
        assert json.loads(first.path.read_text())["pid"] == os.getpid()
    assert not first.path.exists()
    with RunLock(str(tmp_path)):  # free again
        pass


def test_a_live_process_of_another_program_holds_it(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom featshard.store.locks import RunLock\n"
                               f"lock = RunLock({str(tmp_path)!r}); lock.acquire(); print('held', flush=True)\n"
                               "time.sleep(120)"], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FeatshardError, match=f"pid {holder.pid} on {socket.gethostname()}"):
            RunLock(str(tmp_path)).acquire()
        holder.kill()  # SIGKILL: the lock file stays, its process is gone
        holder.wait()
        with RunLock(str(tmp_path)) as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("info, stale", [
    ({"pid": "dead", "host": "here"}, True),
    ({"pid": "me", "host": "here", "create_time": 12345.0}, True),  # our pid, but a process started long ago
    ({"pid": "me", "host": "here"}, False),
    ({"pid": 1, "host": "elsewhere", "refreshed": "now"}, False),  # another host, refreshed recently
    ({"pid": 1, "host": "elsewhere", "refreshed": "old"}, True),  # another host, silent for too long
])
def test_staleness(tmp_path: Path, info: dict[str, object], stale: bool) -> None:
    real = {"dead": dead_pid(), "me": os.getpid(), "here": socket.gethostname(), "now": time.time(),
            "old": time.time() - 3600}
    path = write_lock(tmp_path, **{k: real.get(v, v) if isinstance(v, str) else v for k, v in info.items()})
    lock = RunLock(str(tmp_path), stale_after=300)
    if stale:
        lock.acquire()
        assert json.loads(path.read_text())["pid"] == os.getpid()
        lock.release()
    else:
        with pytest.raises(FeatshardError, match="in use by another run"):
            lock.acquire()


def test_torn_lock_file_is_taken_over_only_once_old(tmp_path: Path) -> None:
    path = write_lock(tmp_path)
    path.write_text("{\"pid\": 12")  # a writer died half-way
    with pytest.raises(FeatshardError, match="unreadable lock"):
        RunLock(str(tmp_path)).acquire()  # it might still be being written
    old = time.time() - 60
    os.utime(path, (old, old))
    with RunLock(str(tmp_path)):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_heartbeat_refreshes_the_lock(tmp_path: Path) -> None:
    with RunLock(str(tmp_path), heartbeat=0.05) as lock:
        first = json.loads(lock.path.read_text())["refreshed"]
        deadline = time.monotonic() + 10
        while json.loads(lock.path.read_text())["refreshed"] == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(lock.path.read_text())["refreshed"] > first
    assert not lock.path.exists()

"""SIGINT, SIGTERM and SIGUSR2 to the coordinator: workers stop, durable state stays, the exit status says which
signal, the message says how to resume, no process of the run is left behind; the same command then resumes.
While the first run is live, a second `run` on the same --out is refused (the run lock, a real second process)."""
from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import cli
from test_resume import (
    ROWS,
    durable,
    extracting,
    mid_chunks,
    progress,
    read_all,
    run_args,
    shared_reference,
    start,
    summary,
    wait_for,
)

pytestmark = pytest.mark.slow  # runs the real pipeline: `make test-fast` leaves it out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return shared_reference(tmp_path_factory)


def session_processes(sid: int) -> list[psutil.Process]:
    procs = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and psutil.os.getsid(proc.pid) == sid:
                procs.append(proc)
        except (psutil.Error, ProcessLookupError):
            continue
    return procs


def freeze_workers(out: Path) -> list[int]:
    """SIGSTOP every live worker of the run (pids from its progress files)."""
    pids = [int(p["pid"]) for p in progress(out).values() if p.get("pid") and p.get("state") != "complete"]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    return pids


def thaw(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_stop_signals_leave_a_resumable_run(reference: tuple[Path, Path], tmp_path: Path) -> None:
    """Three runs on one --out (the reference list twice: 48 rows, chunks of 1), stopped in turn by SIGINT right after
    the models loaded, SIGTERM and SIGUSR2 after new chunks; the fourth completes (while it runs, a second `run` on
    the same --out is refused) and matches the clean run."""
    lst, ref = reference
    twice = tmp_path / "twice.txt"
    twice.write_text(lst.read_text() * 2)
    out = tmp_path / "run"
    args = run_args(twice, out, "--chunk-size", "1")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        before = sum(durable(out).values())
        proc = start(args)
        wait_for(f"the point to send {sig.name}", (lambda: extracting(out)) if sig == signal.SIGINT else
                 mid_chunks(out, before, per_shard=ROWS), proc)
        workers = freeze_workers(out)  # held mid-run however fast this machine extracts, until the stop reaches them
        sent = time.monotonic()
        proc.send_signal(sig)
        time.sleep(1.5)  # the coordinator polls twice a second: its SIGTERM to the workers is pending by now
        thaw(workers)
        _, err = proc.communicate(timeout=60)
        print(f"{sig.name}: the coordinator exited {time.monotonic() - sent:.1f} s after the signal")
        assert proc.returncode == 128 + sig, err
        assert f"stopped by {sig.name}" in err and "rerun the same command to resume" in err
        wait_for("the workers and loaders to exit", lambda: not session_processes(proc.pid), timeout=30)
        states = {p.get("state") for p in progress(out).values()}
        assert states <= {"stopped", "complete"}, (sig.name, states)
        assert not (out / "locks" / "node-0000.lock").exists()  # released on the way out
    at_stop = durable(out)
    last = start(args)
    wait_for("the run lock", (out / "locks" / "node-0000.lock").is_file, last)
    second = cli(*args)  # the first run is live: refused, naming it
    assert second.returncode == 1 and f"in use by another run (pid {last.pid} on " in second.stderr
    _, err = last.communicate(timeout=300)
    assert last.returncode == 0, err
    assert summary(out)["resumed_rows"] == sum(at_stop.values()) > 0
    assert_matches_twice(out, ref)


def assert_matches_twice(out: Path, ref: Path) -> None:
    """Row r and row r + 24 of `out` hold what row r of the clean reference run holds; `verify` passes."""
    def rows(run: Path) -> dict[int, tuple[str, object]]:
        found: dict[int, tuple[str, object]] = {}
        for data in read_all(run).values():
            found.update({int(r): (n, f) for r, n, f in zip(data["rows"], data["names"], data["features"])})
            found.update({int(r): (n, m.split(b":")[0]) for r, n, m in zip(data["failed_rows"], data["failed_names"],
                                                                          data["failed_reasons"])})
        return found

    got, want = rows(out), rows(ref)
    assert sorted(got) == list(range(2 * ROWS))
    for row, (name, value) in got.items():
        ref_name, ref_value = want[row % ROWS]
        assert name == ref_name
        if isinstance(value, bytes):
            assert value == ref_value
        else:
            np.testing.assert_allclose(value, ref_value, atol=1e-5)
    assert cli("verify", str(out)).returncode == 0

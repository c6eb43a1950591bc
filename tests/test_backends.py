"""backends: the pool's first workers preload heavy modules, its replacement workers do not; device faults and
stalled workers are retried from durable chunks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import FAST, REPO, make_images, write_list

from featshard.runner.shardspec import ShardFault, ShardResult, ShardSpec
from featshard.store.rundir import RunDir


def test_only_the_first_workers_preload() -> None:
    code = ("import multiprocessing as mp, sys; "
            "from featshard.runner.pool import _worker_init; v = mp.Value('i', 1); "
            "_worker_init(('colorsys',), v); first = 'colorsys' in sys.modules; "
            "_worker_init(('wave', 'no_such_module_here'), v); print(first, 'wave' in sys.modules, v.value)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["True", "False", "0"]


def test_a_module_that_fails_to_import_does_not_fail_the_worker() -> None:
    code = ("import multiprocessing as mp; from featshard.runner.pool import _worker_init; "
            "_worker_init(('no_such_module_here',), mp.Value('i', 2)); print('alive')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "alive"


def spec_for(tmp_path: Path) -> ShardSpec:
    from featshard.extract.models import ModelSpec, preprocess_for
    from featshard.store.inputs import open_input
    from featshard.store.plan import Shard

    lst = write_list(tmp_path / "list.txt", ["a.jpg", "b.jpg"])
    RunDir(tmp_path / "run").shards.mkdir(parents=True)
    return ShardSpec(run_dir=str(tmp_path / "run"), shard=Shard(0, 1, 0, 2, 0, "cuda:0"), source=open_input(str(lst)),
                     model=ModelSpec("mobilenet_v2", "none"), prep=preprocess_for("mobilenet_v2", "none"),
                     dtype="float32", batch_size=2, loader_workers=0, chunk_size=2, cpu_threads=1)


def test_a_cuda_fault_is_retried_and_a_bug_is_not(tmp_path: Path) -> None:
    from featshard.runner.backends import InlineBackend
    from featshard.runner.coordinator import Outcome, await_all

    spec = spec_for(tmp_path)
    done = ShardResult(spec.shard.name, 0, "cuda:0", "x.h5", 2, 2, 0, 0, 2, 1.0, {})
    calls: list[int] = []

    def flaky(s: ShardSpec) -> ShardResult:
        calls.append(1)
        if len(calls) == 1:
            raise ShardFault(f"{s.shard.name} on cuda:0: AcceleratorError: CUDA error: an illegal memory access")
        return done

    outcome = await_all(InlineBackend(flaky), [spec], 2, [], Outcome())
    assert outcome.results == [done] and outcome.retries == {spec.shard.name: [0]} and not outcome.errors

    def buggy(s: ShardSpec) -> ShardResult:
        raise ValueError("a bug fails the shard at once")

    outcome = await_all(InlineBackend(buggy), [spec], 2, [], Outcome())
    assert not outcome.results and not outcome.retries and "a bug" in outcome.errors[spec.shard.name]


def _wait_running(out: Path, deadline: float) -> dict[str, Any]:
    while time.monotonic() < deadline:
        for path in sorted((out / "shards").glob("*.progress.json")):
            try:
                prog = json.loads(path.read_text())
            except ValueError:
                continue
            if prog.get("state") == "running" and prog.get("rows_done", 0) > 0:
                return prog
        time.sleep(0.2)
    raise AssertionError("no shard started running")


@pytest.mark.slow
def test_a_worker_that_stops_updating_its_progress_is_stopped_and_retried(tmp_path: Path) -> None:
    """SIGSTOP freezes a worker the way a CUDA sync after a device fault or a hung write does: alive, silent."""
    lst = write_list(tmp_path / "list.txt", make_images(tmp_path / "imgs", 5) * 12)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "featshard", "run", "--input", str(lst), "--out", str(out), "--gpus", "cpu:2",
           "--weights", "none", "--chunk-size", "4", *FAST, "--batch-size", "2", "--stall-timeout", "20"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stderr=subprocess.PIPE,
                            text=True)
    try:
        victim = _wait_running(out, time.monotonic() + 180)
        os.kill(victim["pid"], signal.SIGSTOP)
        _, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    assert f"{victim['shard']}: worker pid {victim['pid']} on {victim['device']} stalled" in err and "retry 1/" in err
    summary = json.loads((out / "summary.json").read_text())
    entry = next(s for s in summary["shards"] if s["shard"] == victim["shard"])
    assert summary["ok"] == 60 and summary["complete"] and entry["retries"] >= 1


class _Pending:
    """An apply_async result that never arrives."""

    def ready(self) -> bool:
        return False

    def wait(self, timeout: float | None = None) -> None:
        time.sleep(timeout or 0)


def test_a_killed_runs_progress_file_is_not_taken_for_this_attempts_worker(tmp_path: Path) -> None:
    """A run killed and started again at once: the shard's progress file, seconds old, names the killed worker. The
    pool's handle trusted any file started within a second of its submission, so it saw that dead pid, declared this
    attempt's (live) worker dead and ran the shard a second time. It now trusts only its own attempt's file."""
    from dataclasses import replace

    from featshard.runner.handles import WorkerDied
    from featshard.runner.pool import PoolHandle
    from featshard.store.atomic import write_json_atomic

    spec = replace(spec_for(tmp_path), attempt="this-attempt")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    path = RunDir(spec.run_dir).progress(spec.shard.name)
    handle = PoolHandle(spec, _Pending(), grace=0.2, start_timeout=600)
    write_json_atomic(path, {"pid": dead_pid, "started": time.time(), "attempt": "the-killed-run"})
    with pytest.raises(TimeoutError):  # still waiting for its own worker, not declaring it dead
        handle.result(timeout=1.0)
    write_json_atomic(path, {"pid": dead_pid, "started": time.time(), "attempt": "this-attempt"})
    with pytest.raises(WorkerDied, match=f"worker pid {dead_pid}"):
        handle.result(timeout=5.0)

"""`featshard status`: per-shard progress from manifest + progress files + finished shards, incl. stale detection."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from featshard.store.atomic import write_json_atomic
from featshard.store.manifest import write_manifest
from featshard.store.plan import plan_shards
from featshard.store.shards import Block, write_block
from featshard.runner.status import collect, totals
from featshard.store.rundir import RunDir
from helpers import cli

DIM = 8
HOST = socket.gethostname()


def block(lo: int, hi: int, failed: tuple[int, ...] = ()) -> Block:
    ok = [r for r in range(lo, hi) if r not in failed]
    return Block(np.asarray(ok, np.int64), [f"img{r}.jpg" for r in ok], np.ones((len(ok), DIM), np.float32),
                 np.asarray(failed, np.int64), [f"img{r}.jpg" for r in failed], ["corrupt: bad bytes"] * len(failed))


def progress(run: Path, name: str, **fields: Any) -> None:
    base = {"shard": name, "pid": os.getpid(), "host": HOST, "device": "cpu:0", "state": "running",
            "rows_total": 10, "rows_done": 0, "ok": 0, "failed": 0, "images_per_s": 0.0, "started": time.time(),
            "updated": time.time(), "error": None}
    write_json_atomic(RunDir(run).progress(name), {**base, **fields})


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run of 60 rows in 6 shards of 10, one in each situation `status` must tell apart."""
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    plan = plan_shards(60, ["cpu:0", "cpu:1", "cpu:2"], num_nodes=2)
    write_manifest(run, {"rows": 60, "fingerprint": "f00d", "plan": [s.to_dict() for s in plan]})
    names = [s.name for s in plan]
    # 0: finished (9 ok + 1 failed); its progress file is stale and must lose against the shard file
    write_block(RunDir(run).shard(names[0]), block(0, 10, failed=(3,)), {"fingerprint": "f00d"}, DIM, "float32")
    progress(run, names[0], rows_done=2, ok=2, updated=time.time() - 3600, images_per_s=5.0)
    # 1: running now, by this process, two chunks of 2 rows durable
    RunDir(run).parts(names[1]).mkdir()
    for lo in (10, 12):
        write_block(RunDir(run).chunk(names[1], lo, lo + 2), block(lo, lo + 2), {}, DIM, "float32")
    progress(run, names[1], rows_done=5, ok=5, images_per_s=2.5)
    # 2: running, but no update for 10 minutes
    progress(run, names[2], rows_done=3, ok=3, images_per_s=1.0, updated=time.time() - 600)
    # 3: running, fresh update, but its process is gone on this host
    progress(run, names[3], rows_done=1, ok=1, images_per_s=1.0, pid=dead_pid())
    # 4: no progress file: pending
    # 5: the worker reported a failure
    progress(run, names[5], state="failed", rows_done=4, ok=3, failed=1, error="OSError: disk full")
    return run


def test_states_rows_and_totals(run: Path) -> None:
    status = collect(str(run))
    rows = {s["shard"]: s for s in status["shards"]}
    assert [s["state"] for s in status["shards"]] == ["complete", "running", "stale", "stale", "pending", "failed"]
    done = rows["shard-00000-of-00006"]
    assert (done["rows_done"], done["ok"], done["failed"], done["durable"]) == (10, 9, 1, 10)
    live = rows["shard-00001-of-00006"]
    assert (live["rows_done"], live["durable"], live["images_per_s"], live["pid"]) == (5, 4, 2.5, os.getpid())
    assert (live["node"], rows["shard-00003-of-00006"]["node"]) == (0, 1)
    assert rows["shard-00004-of-00006"]["rows_done"] == 0 and rows["shard-00004-of-00006"]["pid"] is None
    assert rows["shard-00005-of-00006"]["error"] == "OSError: disk full"
    t = status["totals"]
    assert t["states"] == {"complete": 1, "running": 1, "stale": 2, "pending": 1, "failed": 1}
    assert (t["rows"], t["rows_done"], t["durable"]) == (60, 10 + 5 + 3 + 1 + 0 + 4, 14)
    assert t["images_per_s"] == 2.5 and t["eta_s"] == pytest.approx((60 - 23) / 2.5)  # only live shards count
    assert not t["complete"] and not status["index"]


def test_stale_after_and_other_hosts(run: Path) -> None:
    assert collect(str(run), stale_after=3600)["shards"][2]["state"] == "running"
    progress(run, "shard-00003-of-00006", host="some-other-node", pid=dead_pid())
    assert collect(str(run))["shards"][3]["state"] == "running"  # a pid on another host cannot be checked here
    progress(run, "shard-00003-of-00006", host="some-other-node", updated=time.time() - 301)
    assert collect(str(run))["shards"][3]["state"] == "stale"


def test_finished_shard_without_progress_and_torn_file(run: Path) -> None:
    RunDir(run).progress("shard-00000-of-00006").unlink()
    assert collect(str(run))["shards"][0]["state"] == "complete"
    RunDir(run).shard("shard-00004-of-00006").write_bytes(b"not hdf5")  # never counted as finished
    assert collect(str(run))["shards"][4]["state"] == "pending"


def test_cli_table_and_json(run: Path) -> None:
    table = cli("status", str(run), check=True).stdout
    lines = table.splitlines()
    assert lines[0].startswith(f"run {run}: 60 rows in 6 shards")
    assert any(line.startswith("shard-00001-of-00006") and " running " in line and f"{os.getpid()}@{HOST}" in line
               for line in lines)
    assert "error: OSError: disk full" in table
    assert lines[-1].startswith("total: 1 complete, 1 failed, 1 pending, 1 running, 2 stale; 23/60 rows (38.3%)")
    data = json.loads(cli("status", str(run), "--json", check=True).stdout)
    assert [s["state"] for s in data["shards"]] == ["complete", "running", "stale", "stale", "pending", "failed"]
    assert data["totals"]["rows_done"] == 23 and data["slurm"] is None


def test_slurm_jobs_and_index_are_shown(run: Path) -> None:
    (run / "slurm").mkdir()
    write_json_atomic(run / "slurm" / "jobs.json", {"extract": "41", "merge": "42"})
    (run / "index").mkdir()
    (run / "index" / "index.faiss").write_bytes(b"x")
    table = cli("status", str(run), check=True).stdout
    assert "slurm: extract array job 41, merge job 42" in table and table.rstrip().endswith("; index built")


def test_not_a_run(tmp_path: Path) -> None:
    proc = cli("status", str(tmp_path))
    assert proc.returncode == 1 and "no manifest.json" in proc.stderr


def test_submitted_slurm_run_before_any_task_started(tmp_path: Path) -> None:
    (tmp_path / "slurm").mkdir()
    write_json_atomic(tmp_path / "slurm" / "jobs.json", {"extract": "41", "merge": "42"})
    proc = cli("status", str(tmp_path), check=True)
    assert "no task has started yet" in proc.stdout and "'extract': '41'" in proc.stdout
    data = json.loads(cli("status", str(tmp_path), "--json", check=True).stdout)
    assert data["slurm"]["merge"] == "42" and data["shards"] == []


def test_stage_retries_eta_per_shard_and_per_node(run: Path) -> None:
    progress(run, "shard-00001-of-00006", rows_done=5, ok=5, images_per_s=2.5, stage="extracting", retries=1)
    status = collect(str(run))
    live = status["shards"][1]
    assert (live["stage"], live["retries"], live["eta_s"]) == ("extracting", 1, 2.0)  # (10 - 5) / 2.5
    assert status["shards"][0]["stage"] == "done" and status["shards"][4]["eta_s"] is None
    node0, node1 = status["totals"]["nodes"]
    assert (node0["node"], node0["rows"], node0["rows_done"], node0["images_per_s"]) == (0, 30, 18, 2.5)
    assert node0["eta_s"] == pytest.approx(12 / 2.5) and node0["retries"] == 1
    assert (node1["rows_done"], node1["images_per_s"], node1["eta_s"]) == (5, 0.0, None)  # nothing runs there
    table = cli("status", str(run), check=True).stdout
    assert any(" extracting " in line and line.split()[-3] == "1" for line in table.splitlines()
               if line.startswith("shard-00001"))  # retries, then `updated` and pid@host
    assert "node 0: 1 complete, 1 running, 1 stale; 18/30 rows (60.0%)" in table and "(whole job)" in table


def test_whole_job_eta_waits_for_the_slowest_node() -> None:
    """The job ends when its slowest running node does, and not before every row left is done at the total rate."""
    def shard(node: int, total: int, done: int, rate: float) -> dict[str, Any]:
        return {"node": node, "rows_total": total, "rows_done": done, "durable": done, "ok": done, "failed": 0,
                "images_per_s": rate, "state": "running" if rate else "pending", "retries": 0}

    slow_node = totals([shard(0, 200, 100, 1.0), shard(1, 200, 190, 10.0)], 400)
    assert slow_node["eta_s"] == 100.0  # node 0: 100 rows at 1/s; all rows left at 11/s would say 10 s
    waiting_node = totals([shard(0, 200, 100, 10.0), shard(1, 200, 0, 0.0)], 400)
    assert waiting_node["eta_s"] == 30.0  # node 1 has not started: 300 rows at the 10/s running now
    assert totals([shard(0, 10, 0, 0.0)], 10)["eta_s"] is None

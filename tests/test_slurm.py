"""`featshard slurm`: generated scripts against stored references, and real jobs on a real slurmctld.

The cluster tests use a running single-node cluster (`.ci/slurm.sh up`; found through its env.sh or SLURM_CONF),
start one when root with the packages installed, and skip otherwise, unless FEATSHARD_REQUIRE_SLURM=1 (CI) makes
a missing cluster a failure. Set FEATSHARD_UPDATE_REFERENCE=1 to rewrite tests/slurm_reference/ after a deliberate
change of the scripts (then read the diff).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from featshard import __version__
from featshard.store.manifest import write_manifest
from featshard.store.plan import plan_shards
from featshard.store.progress import read_progress
from featshard.runner.status import ACTIVE, collect, durable_rows
from helpers import REPO, cli, make_images, write_list

STATE = Path(os.environ.get("FEATSHARD_SLURM_STATE", "/tmp/featshard-slurm"))
REFERENCE = Path(__file__).resolve().parent / "slurm_reference"
ROWS = 16  # images in the list every real job runs (8 per array task)
FAKE_PYTHON = "/opt/fake env/bin/python"
RUN_OPTS = ["--model", "mobilenet_v2", "--weights", "none", "--precision", "fp32", "--batch-size", "4",
            "--loader-workers", "0", "--chunk-size", "2"]
CASES = {  # (not named "gpu": conftest skips tests with that keyword where CUDA is missing)
    "gpu_nodes": ["--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--account", "proj42", "--time",
            "12:00:00", "--cpus-per-gpu", "6", "--mem", "480G", "--array-parallelism", "2", "--sbatch-arg=--qos=high",
            "--sbatch-arg=--constraint=a100", "--signal", "B:USR2@120", "--max-requeues", "5", "--merge-gpu",
            "--merge-arg=--index-spec=IVF1024,PQ32", "--model", "resnet50", "--weights", "DEFAULT", "--layer",
            "avgpool", "--pool", "gem", "--dtype", "float16", "--precision", "bf16", "--batch-size", "256",
            "--chunk-size", "4096"],
    "cpu_nodes": ["--nodes", "2", "--gpus-per-node", "0", "--cpu-workers-per-node", "3", "--model", "mobilenet_v2",
            "--weights", "none", "--no-normalize"],
}


def generate(tmp: Path, case: str) -> dict[str, str]:
    """Write the scripts of one fixed option set; return them with the temp dir and version normalised."""
    listing = write_list(tmp / "list.txt", ["a.jpg", "b.jpg", "c.jpg"])
    cli("slurm", "--input", str(listing), "--out", str(tmp / "run out"), "--python", FAKE_PYTHON, *CASES[case],
        check=True)
    out = {}
    for name in ("extract", "merge"):
        text = (tmp / "run out" / "slurm" / f"{name}.sbatch").read_text(encoding="utf-8")
        out[name] = text.replace(str(tmp), "@TMP@").replace(f"featshard {__version__} ", "featshard @VERSION@ ")
    return out


def verify_available() -> bool:
    return importlib.util.find_spec("featshard.runner.verify") is not None


@pytest.mark.parametrize("case", sorted(CASES))
def test_scripts_match_reference(tmp_path: Path, case: str) -> None:
    scripts = generate(tmp_path, case)
    if os.environ.get("FEATSHARD_UPDATE_REFERENCE") == "1":
        assert verify_available(), "rewrite the references where featshard has `verify` (its merge.sbatch runs it)"
        REFERENCE.mkdir(exist_ok=True)
        for name, text in scripts.items():
            (REFERENCE / f"{case}-{name}.sbatch").write_text(text, encoding="utf-8")
        pytest.skip("reference rewritten (FEATSHARD_UPDATE_REFERENCE=1)")
    for name, text in scripts.items():
        expected = (REFERENCE / f"{case}-{name}.sbatch").read_text(encoding="utf-8")
        if not verify_available():  # merge.sbatch runs `verify` only once this featshard has that command
            expected = "".join(line for line in expected.splitlines(True) if "-m featshard verify" not in line)
        assert text == expected, f"{case}-{name}.sbatch differs from {REFERENCE}"
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_scripts_carry_no_cluster_assumptions(tmp_path: Path) -> None:
    scripts = generate(tmp_path, "cpu_nodes")
    extract = scripts["extract"]
    assert "--gres" not in extract and "--exclusive" not in extract
    assert "--gpus cpu:3 --num-nodes 2 --node-rank \"$SLURM_ARRAY_TASK_ID\"" in extract
    assert "#SBATCH --cpus-per-task=48" in extract and "#SBATCH --array=0-1\n" in extract  # 3 workers x 16 CPUs
    assert "FEATSHARD_PYTHON='/opt/fake env/bin/python'" in extract and "activate" not in extract
    assert "PYTHONPATH" not in extract  # a python that cannot be checked here is trusted as given


def test_gpu_defaults_feed_the_gpus_and_the_merge_asks_for_its_gpu(tmp_path: Path) -> None:
    listing = write_list(tmp_path / "list.txt", ["a.jpg"])

    def scripts(*extra: str) -> tuple[str, str]:
        cli("slurm", "--input", str(listing), "--out", str(tmp_path / "run"), "--nodes", "1", "--gpus-per-node", "4",
            *extra, check=True)
        return tuple((tmp_path / "run" / "slurm" / f"{n}.sbatch").read_text() for n in ("extract", "merge"))

    extract, merge = scripts("--no-merge-gpu")
    assert "#SBATCH --cpus-per-task=64\n" in extract and "--exclusive" not in extract  # 16 CPUs per GPU
    assert "--gres=gpu:1" not in merge and "-m featshard merge " in merge and " --no-gpu" in merge
    extract, merge = scripts("--exclusive", "--merge-gpu")
    assert "#SBATCH --exclusive\n" in extract and "--cpus-per-task" not in extract
    assert "#SBATCH --gres=gpu:4\n" in extract
    assert "#SBATCH --gres=gpu:1\n" in merge and " --gpu" in merge and "--no-gpu" not in merge
    proc = cli("slurm", "--input", str(listing), "--out", str(tmp_path / "run"), "--nodes", "1", "--gpus-per-node",
               "4", "--merge-arg=--gpu")
    assert proc.returncode == 2 and "--merge-gpu" in proc.stderr


def test_another_warning_signal_is_trapped_and_forwarded_as_usr2(tmp_path: Path) -> None:
    listing = write_list(tmp_path / "list.txt", ["a.jpg"])
    cli("slurm", "--input", str(listing), "--out", str(tmp_path / "run"), "--nodes", "1", "--gpus-per-node", "1",
        "--signal", "R:B:10@300", check=True)
    extract = (tmp_path / "run" / "slurm" / "extract.sbatch").read_text()
    assert "#SBATCH --signal=R:B:10@300\n" in extract and "WARN_SIGNAL=USR1\n" in extract
    assert 'trap "forward $WARN_SIGNAL USR2" "$WARN_SIGNAL"' in extract


def test_dry_run_prints_plan_and_scripts(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "img", 5)
    listing = write_list(tmp_path / "list.txt", paths)
    proc = cli("slurm", "--input", str(listing), "--out", str(tmp_path / "run"), "--nodes", "2", "--gpus-per-node",
               "2", "--dry-run", *RUN_OPTS, check=True)
    assert "5 rows" in proc.stdout and "2 array task(s) x 2 shard(s) = 4 shards" in proc.stdout
    plan = re.findall(r"^\s+(\d)\s+(shard-\d+-of-00004)\s+(cuda:\d)\s+\[(\d+), (\d+)\)", proc.stdout, re.M)
    assert plan == [("0", "shard-00000-of-00004", "cuda:0", "0", "1"),
                    ("0", "shard-00001-of-00004", "cuda:1", "1", "2"),
                    ("1", "shard-00002-of-00004", "cuda:0", "2", "3"),
                    ("1", "shard-00003-of-00004", "cuda:1", "3", "5")]
    assert "#SBATCH --gres=gpu:2" in proc.stdout and "-m featshard merge" in proc.stdout
    assert "nothing submitted" in proc.stdout and not (tmp_path / "run" / "slurm" / "jobs.json").exists()


@pytest.mark.parametrize("bad, message", [
    (["--gpus-per-node", "2", "--cpu-workers-per-node", "2"], "--cpu-workers-per-node is for CPU-only jobs"),
    (["--gpus-per-node", "0", "--overwrite"], "--overwrite is refused"),
    (["--gpus-per-node", "0", "--cpu-workers-per-node", "0"], "must be >= 1"),
    (["--gpus-per-node", "1", "--partition", 'a"b'], "double quote"),
    (["--gpus-per-node", "1", "--signal", "USR2@90"], "use B:USR2"),
    (["--gpus-per-node", "1", "--signal", "B:TERM@90"], "SIGTERM cannot be the warning signal"),
    (["--gpus-per-node", "1", "--signal", "B:NOPE@90"], "unknown signal"),
])
def test_bad_options_are_refused(tmp_path: Path, bad: list[str], message: str) -> None:
    listing = write_list(tmp_path / "list.txt", ["a.jpg"])
    proc = cli("slurm", "--input", str(listing), "--out", str(tmp_path / "run"), "--nodes", "1", *bad)
    assert proc.returncode == 2 and message in proc.stderr


def test_a_different_plan_for_an_existing_run_is_refused(tmp_path: Path) -> None:
    listing = write_list(tmp_path / "list.txt", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    (tmp_path / "run").mkdir()
    write_manifest(tmp_path / "run", {"plan": [s.to_dict() for s in plan_shards(4, ["cpu:0"], num_nodes=2)]})
    base = ["slurm", "--input", str(listing), "--out", str(tmp_path / "run"), "--gpus-per-node", "0", "--dry-run"]
    assert cli(*base, "--nodes", "2", check=True).returncode == 0
    proc = cli(*base, "--nodes", "4")
    assert proc.returncode == 2 and "was planned as 2 shards" in proc.stderr


def test_submit_without_slurm_is_a_clear_error(tmp_path: Path) -> None:
    listing = write_list(tmp_path / "list.txt", ["a.jpg"])
    env = {"PATH": str(tmp_path)}  # no sbatch on PATH
    proc = cli("slurm", "--input", str(listing), "--out", str(tmp_path / "run"), "--nodes", "1", "--gpus-per-node",
               "0", "--submit", env=env)
    assert proc.returncode == 1 and "sbatch not found" in proc.stderr


# ---------------------------------------------------------------- a real cluster

def _env_from_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"export (\w+)=(.*)$", line.strip())
        if m:
            env[m.group(1)] = m.group(2).strip("'\"")
    return env


def _running_cluster() -> dict[str, str] | None:
    extra = _env_from_file(STATE / "env.sh") if (STATE / "env.sh").is_file() else {}
    if not extra and os.environ.get("SLURM_CONF"):
        extra = {"SLURM_CONF": os.environ["SLURM_CONF"]}
    if not extra or not shutil.which("sinfo"):
        return None
    env = dict(os.environ, **extra)
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return None
    return extra if proc.returncode == 0 and re.search(r"idle|mix|alloc", proc.stdout) else None


@pytest.fixture(scope="session")
def slurm_env() -> Any:
    extra, started, reason = _running_cluster(), False, ""
    if extra is None:
        if os.geteuid() != 0:
            reason = "no running SLURM cluster and not root to start one (bash .ci/slurm.sh up)"
        elif not all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "munged")):
            reason = "SLURM packages not installed (bash .ci/slurm.sh up installs and starts them)"
        else:
            proc = subprocess.run(["bash", str(REPO / ".ci" / "slurm.sh"), "up"], capture_output=True, text=True,
                                  timeout=180, stdin=subprocess.DEVNULL)
            extra, started = _running_cluster(), proc.returncode == 0
            reason = f".ci/slurm.sh up failed ({proc.returncode}): {proc.stderr[-2000:]}"
    if extra is None:
        if os.environ.get("FEATSHARD_REQUIRE_SLURM") == "1":
            pytest.fail(f"FEATSHARD_REQUIRE_SLURM=1 but no SLURM cluster: {reason}")
        pytest.skip(reason)
    yield extra
    if started:
        subprocess.run(["bash", str(REPO / ".ci" / "slurm.sh"), "down"], capture_output=True, timeout=60)


def slurm_cmd(extra: dict[str, str], *cmd: str, check: bool = True) -> str:
    proc = subprocess.run(cmd, env=dict(os.environ, **extra), capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {proc.returncode}: {proc.stderr}")
    return proc.stdout


def jobs(extra: dict[str, str], job_id: str) -> list[dict[str, str]]:
    """One record per job / array task from `scontrol -o show job` (kept MinJobAge=300 s after the end)."""
    out = slurm_cmd(extra, "scontrol", "-o", "show", "job", job_id)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def wait_gone(extra: dict[str, str], ids: list[str], out: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while slurm_cmd(extra, "squeue", "-h", "-j", ",".join(ids), "-o", "%i", check=False).strip():
        assert time.monotonic() < deadline, f"jobs {ids} still queued after {timeout} s\n{logs_tail(out)}"
        time.sleep(0.3)


SUBMITTED: list[tuple[dict[str, str], str]] = []


@pytest.fixture(autouse=True)
def cancel_leftover_jobs() -> Any:
    """A failed test must not leave its jobs running on the shared test cluster."""
    yield
    while SUBMITTED:
        extra, job_id = SUBMITTED.pop()
        slurm_cmd(extra, "scancel", job_id, check=False)


def submit(extra: dict[str, str], listing: Path, out: Path, *more: str) -> dict[str, Any]:
    cli("slurm", "--input", str(listing), "--out", str(out), "--nodes", "2", "--gpus-per-node", "0",
        "--cpu-workers-per-node", "1", "--cpus-per-gpu", "1", "--submit", *more, *RUN_OPTS, env=extra, check=True)
    ids = json.loads((out / "slurm" / "jobs.json").read_text())
    SUBMITTED.extend((extra, ids[k]) for k in ("extract", "merge"))
    return ids


def index_contents(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of a run's flat index, sorted by id."""
    from featshard.index.faissutil import unwrap
    from featshard.index.reader import load_index, stored_ids

    index = load_index(run).index
    ids = stored_ids(index)
    vectors = unwrap(index).reconstruct_n(0, index.ntotal)
    order = np.argsort(ids)
    return ids[order], vectors[order]


@pytest.fixture(scope="module")
def local_run(slurm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """16 images, run locally as 2 CPU shards + merge: what every SLURM run of that list must reproduce.
    Built in the background while the first SLURM job runs; `future.result()` is the local run dir."""
    tmp = tmp_path_factory.mktemp("slurm-local")
    listing = write_list(tmp / "list.txt", make_images(tmp / "img", ROWS))

    def build() -> Path:
        cli("run", "--input", str(listing), "--out", str(tmp / "local"), "--gpus", "cpu:2", *RUN_OPTS, check=True)
        cli("merge", str(tmp / "local"), check=True)
        return tmp / "local"

    with ThreadPoolExecutor(1) as pool:
        yield listing, pool.submit(build)


def assert_same_index(run: Path, local: Future[Path]) -> None:
    ids, vectors = index_contents(run)
    ref_ids, ref_vectors = index_contents(local.result(timeout=600))
    assert ids.tolist() == ref_ids.tolist() == list(range(ROWS))
    np.testing.assert_allclose(vectors, ref_vectors, rtol=0, atol=1e-5)


@pytest.mark.slurm
def test_array_job_and_merge_equal_a_local_run(slurm_env: dict[str, str], local_run: tuple[Path, Future[Path]],
                                               tmp_path: Path) -> None:
    listing, local = local_run
    out = tmp_path / "run"
    ids = submit(slurm_env, listing, out)
    wait_gone(slurm_env, [ids["extract"], ids["merge"]], out)
    tasks = jobs(slurm_env, ids["extract"])
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1"]
    assert all(t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0" for t in tasks), f"{tasks}\n{logs_tail(out)}"
    assert jobs(slurm_env, ids["merge"])[0]["JobState"] == "COMPLETED"
    logs = out / "slurm" / "logs"
    assert {p.name for p in logs.iterdir()} == {f"extract-{ids['extract']}_0.out", f"extract-{ids['extract']}_1.out",
                                                f"merge-{ids['merge']}.out"}
    assert_same_index(out, local)
    status = json.loads(cli("status", str(out), "--json", check=True).stdout)
    assert status["totals"]["complete"] and status["slurm"]["extract"] == ids["extract"] and status["index"]


def logs_tail(out: Path, lines: int = 15) -> str:
    """The end of every SLURM log of a run: what an assertion about its jobs should show."""
    tails = [f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
             for p in sorted((out / "slurm" / "logs").glob("*.out"))]
    return "\n".join(tails) or "(no logs)"


def freeze_mid_run(extra: dict[str, str], out: Path, tasks: dict[str, str], timeout: float = 120) -> None:
    """SIGSTOP each shard's worker as soon as its first chunk is durable, watching all the tasks at once (they run in
    parallel: one may finish while the test waits for another), so every task is certainly mid-run when the test
    interrupts it, however fast this machine is. SLURM's kill sequence (SIGCONT, SIGTERM, ...) or the coordinator's
    stop (SIGTERM, SIGKILL after a grace period) then ends the worker as it would a hung one. `tasks`: shard -> task."""
    deadline, frozen = time.monotonic() + timeout, set()
    while len(frozen) < len(tasks):
        for shard, task in tasks.items():
            progress = read_progress(str(out), shard) or {}
            if shard not in frozen and durable_rows(str(out), shard) >= 2 and progress.get("pid"):
                os.kill(int(progress["pid"]), signal.SIGSTOP)
                frozen.add(shard)
                assert durable_rows(str(out), shard) < ROWS // 2 and not (out / "shards" / f"{shard}.h5").exists()
            elif shard not in frozen and not slurm_cmd(extra, "squeue", "-h", "-j", task, "-o", "%i",
                                                       check=False).strip():
                pytest.fail(f"task {task} ended before its first chunk\n{logs_tail(out)}")
        assert time.monotonic() < deadline, f"{sorted(set(tasks) - frozen)}: no finished chunk after {timeout} s\n" \
            f"{logs_tail(out)}"
        time.sleep(0.02)


@pytest.mark.slurm
def test_requeued_tasks_resume_without_duplicate_or_missing_rows(
        slurm_env: dict[str, str], local_run: tuple[Path, Future[Path]], tmp_path: Path) -> None:
    """Task 0 is requeued by the scheduler (`scontrol requeue`: SIGTERM, then back to the queue); task 1 gets the
    time-limit warning signal (USR2 to the batch shell) and requeues itself. Both resume from their chunks."""
    listing, local = local_run
    out = tmp_path / "run"
    ids = submit(slurm_env, listing, out)
    array = ids["extract"]
    freeze_mid_run(slurm_env, out, {"shard-00000-of-00002": f"{array}_0", "shard-00001-of-00002": f"{array}_1"})
    live = collect(str(out))["shards"][0]  # what `featshard status` shows while the task runs
    assert live["state"] in ACTIVE and live["durable"] >= 2 and live["host"] == socket.gethostname(), live
    slurm_cmd(slurm_env, "scontrol", "requeue", f"{array}_0")
    slurm_cmd(slurm_env, "scancel", "--batch", "--signal=USR2", f"{array}_1")
    wait_gone(slurm_env, [array, ids["merge"]], out)
    tasks = {t["ArrayTaskId"]: t for t in jobs(slurm_env, array)}
    states = {k: (t["JobState"], t["Restarts"]) for k, t in tasks.items()}
    assert states == {"0": ("COMPLETED", "1"), "1": ("COMPLETED", "1")}, f"{states}\n{logs_tail(out)}"
    assert jobs(slurm_env, ids["merge"])[0]["JobState"] == "COMPLETED"
    log0 = (out / "slurm" / "logs" / f"extract-{array}_0.out").read_text()
    assert "DUE TO JOB REQUEUE" in log0 and "received SIGTERM" in log0 and "restart 1 of at most 3" in log0
    log1 = (out / "slurm" / "logs" / f"extract-{array}_1.out").read_text()
    assert "received SIGUSR2" in log1 and "requeueing this task (1/3)" in log1 and "restart 1 of at most 3" in log1
    for node in (0, 1):
        summary = json.loads((out / f"summary-node-{node:04d}.json").read_text())
        assert summary["resumed_rows"] >= 2 and summary["resumed_rows"] + summary["processed_rows"] == ROWS // 2
    assert_same_index(out, local)


@pytest.mark.slurm
def test_merge_is_cancelled_when_a_task_fails(slurm_env: dict[str, str], tmp_path: Path) -> None:
    listing = write_list(tmp_path / "list.txt", make_images(tmp_path / "img", 4))
    out = tmp_path / "run"
    (out / "shards").mkdir(parents=True)
    blocker = out / "shards" / "shard-00001-of-00002.parts"
    blocker.write_text("a file where node 1 must make its chunk folder\n")
    ids = submit(slurm_env, listing, out)
    wait_gone(slurm_env, [ids["extract"], ids["merge"]], out)
    tasks = {t["ArrayTaskId"]: t for t in jobs(slurm_env, ids["extract"])}
    assert tasks["0"]["JobState"] == "COMPLETED" and tasks["1"]["JobState"] == "FAILED", tasks
    merge = jobs(slurm_env, ids["merge"])[0]
    assert merge["JobState"] == "CANCELLED" and merge["Reason"] == "DependencyNeverSatisfied", merge
    assert not (out / "index").exists() and not list((out / "slurm" / "logs").glob("merge-*"))
    log1 = (out / "slurm" / "logs" / f"extract-{ids['extract']}_1.out").read_text()
    assert "the state is resumable" in log1 and "sbatch --array=1" in log1
    blocker.unlink()  # the cause is fixed: the same command resumes, node 0's shard is not redone
    again = submit(slurm_env, listing, out)
    wait_gone(slurm_env, [again["extract"], again["merge"]], out)
    assert jobs(slurm_env, again["merge"])[0]["JobState"] == "COMPLETED"
    assert json.loads((out / "summary-node-0000.json").read_text())["processed_rows"] == 0
    status = json.loads(cli("status", str(out), "--json", check=True).stdout)
    assert status["totals"]["complete"] and status["totals"]["rows_done"] == 4 and status["index"]


PROBE = """
import json, os, sys
from featshard.cli import build_parser
from featshard.options import from_namespace
from featshard.runner.config import RunConfig
from featshard.runner.coordinator import node_layout
from featshard.runner.devices import parse_gpus, physical_id
argv = sys.argv[1:]
assert argv[:3] == ["-m", "featshard", "run"], argv
args = from_namespace(RunConfig, build_parser(argv[2:]).parse_args(argv[2:]))
cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
devices = parse_gpus(args.gpus, visible=len(cvd.split(",")) if cvd else 0)
nodes, rank = node_layout(args)
with open(os.path.join(args.out, f"probe-{rank}.json"), "w") as fh:
    json.dump({"cvd": cvd, "job_gpus": os.environ.get("SLURM_JOB_GPUS"), "nodes": nodes, "rank": rank,
               "devices": [str(d) for d in devices], "physical": [physical_id(d.index, cvd) for d in devices]}, fh)
"""


@pytest.mark.slurm
def test_gpu_tasks_get_their_gpus_and_featshard_maps_them(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """The generated GPU array (--gres=gpu:2) on the cluster's 4 fake GPUs. No CUDA is behind them, so the task's
    Python is a probe: it parses the exact `featshard run` command line with run's own parser and maps the
    devices with featshard.runner.devices, as the coordinator does before pinning its workers."""
    (tmp_path / "probe.py").write_text(PROBE)
    probe = tmp_path / "python-probe"
    probe.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'probe.py'} \"$@\"\n")
    probe.chmod(0o755)
    listing = write_list(tmp_path / "list.txt", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    out = tmp_path / "run"
    cli("slurm", "--input", str(listing), "--out", str(out), "--nodes", "2", "--gpus-per-node", "2", "--cpus-per-gpu",
        "1", "--python", str(probe), "--model", "mobilenet_v2", env=slurm_env, check=True)
    array = slurm_cmd(slurm_env, "sbatch", "--parsable", str(out / "slurm" / "extract.sbatch")).strip()
    SUBMITTED.append((slurm_env, array))
    wait_gone(slurm_env, [array], out)
    assert [t["JobState"] for t in jobs(slurm_env, array)] == ["COMPLETED", "COMPLETED"]
    for rank in (0, 1):
        probed = json.loads((out / f"probe-{rank}.json").read_text())
        gpus = probed["cvd"].split(",")
        assert len(gpus) == 2 and set(gpus) <= {"0", "1", "2", "3"}, probed
        assert probed["devices"] == ["cuda:0", "cuda:1"] and probed["physical"] == gpus, probed
        assert probed["job_gpus"] == probed["cvd"] and (probed["nodes"], probed["rank"]) == (2, rank)

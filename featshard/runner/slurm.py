"""`featshard slurm`: write (and submit) a SLURM job array that runs `featshard run` across nodes, plus a merge job.

One array task per node; each runs the same `featshard run` as a local run with `--num-nodes N --node-rank
$SLURM_ARRAY_TASK_ID`, on the GPUs SLURM gives it. The merge job depends on the whole array (afterok). On the warning
signal (default B:USR2@90) a task leaves durable state and requeues itself, up to --max-requeues times.
Options not listed under "slurm options" are `featshard run` options and pass through unchanged.
Values that start with '-' need '=': --sbatch-arg=--qos=high --merge-arg=--index-spec=IVF256,Flat
"""
from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from featshard.errors import FeatshardError, UsageError
from featshard.store.inputs import open_input, scan_input
from featshard.store.atomic import write_atomic, write_json_atomic
from featshard.store.manifest import load_manifest
from featshard.store.rundir import RunDir
from featshard.store.plan import Shard, plan_shards
from featshard.options import to_argv
from featshard.runner.config import RunConfig, SlurmConfig
from featshard.runner.doctor import faiss_gpu_build
from featshard.runner.slurmscripts import JobSpec, extract_script, merge_script, warning_signal

log = logging.getLogger("featshard.runner.slurm")


def run_argv(config: SlurmConfig) -> list[str]:
    """The `run` options for every task, in `run`'s own order, as command-line words (a weights file absolute)."""
    values = dict(config.run_options)
    weights = values.get("weights")
    if isinstance(weights, str) and os.path.exists(weights):
        values["weights"] = os.path.abspath(weights)
    return to_argv(RunConfig, values)


def needs_pythonpath(python: str) -> str | None:
    """The source tree to put on PYTHONPATH when `python` cannot import featshard on its own (not installed)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        proc = subprocess.run([python, "-c", "import featshard"], cwd="/", env=env, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        log.warning("cannot run %s here; assuming it runs featshard on the nodes", python)
        return None
    return None if proc.returncode == 0 else str(Path(__file__).resolve().parent.parent)


def job_spec(config: SlurmConfig) -> JobSpec:
    warning_signal(config.signal)
    workers = 1 if config.cpu_workers_per_node is None else config.cpu_workers_per_node
    source = open_input(config.input)
    python = config.python or sys.executable
    return JobSpec(
        input=source.path, out=os.path.abspath(config.out), nodes=config.nodes, gpus_per_node=config.gpus_per_node,
        cpu_workers=workers, python=python, cpus_per_worker=config.cpus_per_gpu,
        partition=config.partition, time=config.time, account=config.account, mem=config.mem,
        array_parallelism=config.array_parallelism, signal=config.signal, max_requeues=config.max_requeues,
        sbatch_args=list(config.sbatch_arg), run_args=run_argv(config), merge_args=list(config.merge_arg),
        pythonpath=needs_pythonpath(python), exclusive=config.exclusive, merge_gpu=merge_on_gpu(config))


def merge_on_gpu(config: SlurmConfig) -> bool:
    """--merge-gpu as given; by default a GPU for the merge when the extraction has GPUs and the faiss installed
    here (the nodes run this Python) is a GPU build."""
    if config.merge_gpu is not None:
        return config.merge_gpu
    return config.gpus_per_node > 0 and faiss_gpu_build()


def write_scripts(spec: JobSpec) -> tuple[Path, Path]:
    out = Path(spec.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {spec.out} exists and is not a directory")
    (spec.slurm_dir / "logs").mkdir(parents=True, exist_ok=True)
    paths = (spec.slurm_dir / "extract.sbatch", spec.slurm_dir / "merge.sbatch")
    for path, text in zip(paths, (extract_script(spec), merge_script(spec))):
        write_atomic(path, text, mode=0o755)
    return paths


def plan_of(spec: JobSpec) -> tuple[int, str, list[Shard]]:
    """Rows, input sha256 and the whole job's shard plan; refuses a plan that differs from an existing run's."""
    rows, sha = scan_input(open_input(spec.input))
    plan = plan_shards(rows, spec.devices_per_node, spec.nodes)
    if RunDir(spec.out).manifest.is_file():
        old = load_manifest(spec.out).get("plan") or []
        if [(s["start"], s["stop"]) for s in old] != [(s.start, s.stop) for s in plan]:
            raise UsageError(f"{spec.out} was planned as {len(old)} shards; --nodes {spec.nodes} x "
                             f"{len(spec.devices_per_node)} plans {len(plan)} (or the input changed). Resume with the "
                             "options it was started with, or use a new --out.")
    return rows, sha, plan


def plan_text(rows: int, sha: str, plan: list[Shard], spec: JobSpec) -> str:
    lines = [f"input: {spec.input} ({rows} rows, sha256 {sha[:16]})",
             f"plan: {spec.nodes} array task(s) x {len(spec.devices_per_node)} shard(s) = {len(plan)} shards",
             f"{'task':>4}  {'shard':<22} {'device':<8} {'rows':>21} {'count':>9}"]
    for s in plan:
        lines.append(f"{s.node:>4}  {s.name:<22} {s.device:<8} {f'[{s.start}, {s.stop})':>21} {s.rows:>9}")
    return "\n".join(lines)


def sbatch(*words: str) -> str:
    """`sbatch --parsable ...` -> the job id (a clear error when SLURM is missing or refuses)."""
    cmd = ["sbatch", "--parsable", *words]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise FeatshardError("sbatch not found: run --submit on a SLURM login node (or submit the scripts by "
                             "hand)") from None
    if proc.returncode != 0:
        raise FeatshardError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def submit(spec: JobSpec, extract: Path, merge: Path) -> tuple[str, str]:
    array_id = sbatch(str(extract))
    merge_id = sbatch(f"--dependency=afterok:{array_id}", str(merge))
    record = {"extract": array_id, "merge": merge_id, "submitted": time.time(), "nodes": spec.nodes,
              "scripts": [str(extract), str(merge)]}
    write_json_atomic(RunDir(spec.out).slurm_jobs, record)
    return array_id, merge_id


@dataclass
class SlurmJob:
    """What `featshard slurm` wrote (and submitted): the scripts, the job ids, and the rendered plan."""

    extract_script: Path
    merge_script: Path
    logs: Path
    python: str
    out: str
    nodes: int
    plan: str = ""
    extract_job: str | None = None
    merge_job: str | None = None


def slurm_job(config: SlurmConfig) -> SlurmJob:
    """`featshard slurm` as a function: write the scripts; with `dry_run` render the plan, with `submit` sbatch."""
    spec = job_spec(config)
    plan = plan_text(*plan_of(spec), spec) if config.dry_run or config.submit else ""
    extract, merge = write_scripts(spec)
    job = SlurmJob(extract, merge, spec.slurm_dir / "logs", spec.python, spec.out, spec.nodes, plan)
    if config.submit:
        job.extract_job, job.merge_job = submit(spec, extract, merge)
    return job

"""`featshard slurm`: write (and submit) a SLURM job array that runs `featshard run` across nodes, plus a merge job.

One array task per node; each runs the same `featshard run` as a local run with `--num-nodes N --node-rank
$SLURM_ARRAY_TASK_ID`, on the GPUs SLURM gives it. The merge job depends on the whole array (afterok). On the warning
signal (default B:USR2@90) a task leaves durable state and requeues itself, up to --max-requeues times.
Options not listed under "slurm options" are `featshard run` options and pass through unchanged.
Values that start with '-' need '=': --sbatch-arg=--qos=high --merge-arg=--index-spec=IVF256,Flat
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from featshard.cli import COMMANDS
from featshard.errors import FeatshardError, UsageError
from featshard.store.inputs import open_input, scan_input
from featshard.store.manifest import load_manifest, manifest_path, write_json_atomic
from featshard.store.plan import Shard, plan_shards
from featshard.runner.slurmscripts import JobSpec, extract_script, merge_script, warning_signal

log = logging.getLogger("featshard.runner.slurm")
OWN_RUN_OPTIONS = {"help", "input", "out", "gpus", "num_nodes", "node_rank", "dry_run"}
RUN_PREFIX = "run__"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("slurm options")
    g.add_argument("--input", required=True, help="list file, CSV/TSV/parquet, directory or tars (as for `run`)")
    g.add_argument("--out", required=True, help="run directory on a filesystem every node sees")
    g.add_argument("--nodes", type=int, required=True, help="array tasks (one node's share of the shards each)")
    g.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per task (--gres=gpu:G); 0 = CPU only")
    g.add_argument("--cpu-workers-per-node", type=int, default=None, help="CPU workers per task with 0 GPUs")
    g.add_argument("--cpus-per-gpu", type=int, default=4, help="CPUs per GPU (or CPU worker) (default 4)")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--time", default=None, help="time limit per task, e.g. 04:00:00 (default: the partition's)")
    g.add_argument("--mem", default=None, help="memory per task, e.g. 64G (default: the partition's)")
    g.add_argument("--array-parallelism", type=int, default=None, help="at most K tasks at once (%%K)")
    g.add_argument("--signal", default="B:USR2@90", help="warning signal before the limit (default B:USR2@90)")
    g.add_argument("--max-requeues", type=int, default=3, help="self-requeues per task on the signal (default 3)")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG", help="extra #SBATCH line (both jobs)")
    g.add_argument("--merge-arg", action="append", default=[], metavar="ARG", help="extra `featshard merge` option")
    g.add_argument("--python", default=None, help="Python that runs featshard on the nodes (default: this one)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the shard plan and both scripts")
    mode.add_argument("--submit", action="store_true", help="sbatch the array, then the merge (afterok)")
    add_run_options(p.add_argument_group("run options (passed to `featshard run` unchanged)"))


def run_parser() -> argparse.ArgumentParser:
    from featshard.runner import coordinator

    parser = argparse.ArgumentParser(add_help=False)
    coordinator.add_arguments(parser)
    return parser


def add_run_options(group: argparse._ArgumentGroup) -> None:
    """Mirror `run`'s own options (types and choices included) so they are checked here and passed on as given."""
    for action in run_parser()._actions:
        if action.dest in OWN_RUN_OPTIONS or not action.option_strings:
            continue
        kwargs: dict[str, object] = {"dest": RUN_PREFIX + action.dest, "default": argparse.SUPPRESS,
                                     "help": action.help}
        if action.nargs == 0:
            kwargs["action"] = "store_const"
            kwargs["const"] = True
        else:
            kwargs.update(type=action.type, choices=action.choices, metavar=action.metavar or action.dest.upper())
        group.add_argument(*action.option_strings, **kwargs)  # type: ignore[arg-type]


def run_argv(args: argparse.Namespace) -> list[str]:
    """The run options the user gave, in `run`'s own order, as command-line words."""
    words: list[str] = []
    for action in run_parser()._actions:
        key = RUN_PREFIX + action.dest
        if not hasattr(args, key):
            continue
        value = getattr(args, key)
        flag = action.option_strings[-1]
        if action.nargs == 0:
            words.append(flag)
        else:
            if action.dest == "weights" and os.path.exists(str(value)):
                value = os.path.abspath(str(value))
            words += [flag, str(value)]
    return words


def needs_pythonpath(python: str) -> str | None:
    """The source tree to put on PYTHONPATH when `python` cannot import featshard on its own (not installed)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        proc = subprocess.run([python, "-c", "import featshard"], cwd="/", env=env, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        log.warning("cannot run %s here; assuming it runs featshard on the nodes", python)
        return None
    return None if proc.returncode == 0 else str(Path(__file__).resolve().parent.parent)


def job_spec(args: argparse.Namespace) -> JobSpec:
    if args.nodes < 1:
        raise UsageError("--nodes must be >= 1")
    if args.gpus_per_node < 0:
        raise UsageError("--gpus-per-node must be >= 0")
    if args.gpus_per_node > 0 and args.cpu_workers_per_node is not None:
        raise UsageError("--cpu-workers-per-node is for CPU-only jobs (--gpus-per-node 0)")
    workers = 1 if args.cpu_workers_per_node is None else args.cpu_workers_per_node
    if workers < 1 or args.cpus_per_gpu < 1 or args.max_requeues < 0 or (args.array_parallelism or 1) < 1:
        raise UsageError("--cpu-workers-per-node, --cpus-per-gpu and --array-parallelism must be >= 1, "
                         "--max-requeues >= 0")
    warning_signal(args.signal)
    if getattr(args, RUN_PREFIX + "overwrite", False):
        raise UsageError("--overwrite is refused for SLURM jobs: every task (and every requeued task) would wipe the "
                         "others' work; remove the run directory yourself or use a new --out")
    source = open_input(args.input)
    python = args.python or sys.executable
    return JobSpec(
        input=source.path, out=os.path.abspath(args.out), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        cpu_workers=workers, python=python, cpus_per_worker=args.cpus_per_gpu,
        partition=args.partition, time=args.time, account=args.account, mem=args.mem,
        array_parallelism=args.array_parallelism, signal=args.signal, max_requeues=args.max_requeues,
        sbatch_args=list(args.sbatch_arg), run_args=run_argv(args), merge_args=list(args.merge_arg),
        pythonpath=needs_pythonpath(python), verify=has_command("verify"))


def has_command(name: str) -> bool:
    return name in COMMANDS and importlib.util.find_spec(COMMANDS[name][0]) is not None


def write_scripts(spec: JobSpec) -> tuple[Path, Path]:
    out = Path(spec.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {spec.out} exists and is not a directory")
    (spec.slurm_dir / "logs").mkdir(parents=True, exist_ok=True)
    paths = (spec.slurm_dir / "extract.sbatch", spec.slurm_dir / "merge.sbatch")
    for path, text in zip(paths, (extract_script(spec), merge_script(spec))):
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o755)
        os.replace(tmp, path)
    return paths


def plan_of(spec: JobSpec) -> tuple[int, str, list[Shard]]:
    """Rows, input sha256 and the whole job's shard plan; refuses a plan that differs from an existing run's."""
    rows, sha = scan_input(open_input(spec.input))
    plan = plan_shards(rows, spec.devices_per_node, spec.nodes)
    if manifest_path(spec.out).is_file():
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
    write_json_atomic(spec.slurm_dir / "jobs.json", record)
    return array_id, merge_id


def command(args: argparse.Namespace) -> int:
    spec = job_spec(args)
    rows, sha, plan = plan_of(spec) if args.dry_run or args.submit else (0, "", [])
    extract, merge = write_scripts(spec)
    if args.dry_run:
        print(plan_text(rows, sha, plan, spec))
        for path in (extract, merge):
            print(f"\n# ===== {path} =====")
            print(path.read_text(encoding="utf-8"), end="")
        print(f"\n# dry run: nothing submitted (submit with --submit, or: sbatch {extract})")
        return 0
    if not args.submit:
        print(f"wrote {extract}\nwrote {merge}\nsubmit with --submit, or by hand:\n"
              f"  id=$(sbatch --parsable {shlex.quote(str(extract))})\n"
              f"  sbatch --dependency=afterok:$id {shlex.quote(str(merge))}")
        return 0
    array_id, merge_id = submit(spec, extract, merge)
    print(f"extract array job {array_id} ({spec.nodes} task(s)), logs in {spec.slurm_dir / 'logs'}")
    print(f"merge job {merge_id} (after the whole array succeeds)")
    print(f"progress: {shlex.quote(spec.python)} -m featshard status {shlex.quote(spec.out)}")
    return 0

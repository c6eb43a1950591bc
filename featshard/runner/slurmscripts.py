"""The two sbatch scripts of `featshard slurm`: the extraction job array and the dependent merge job.

`JobSpec` holds everything they depend on; `extract_script` / `merge_script` render them (pure functions of the
spec, so tests compare them with stored references).
"""
from __future__ import annotations

import shlex
import signal
from dataclasses import dataclass, field
from pathlib import Path

from featshard import __version__
from featshard.runner.devices import Device
from featshard.errors import UsageError

# The part of the array script after the `run_featshard` function: forward the warning signal to featshard, wait
# for it to leave durable state, then requeue this task only (bounded) or exit saying how to resume.
TASK_BODY = r"""
task="${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_${SLURM_ARRAY_TASK_ID:-0}"
note() { echo "featshard-slurm $(date '+%F %T') task $task: $*" >&2; }
restarts=${SLURM_RESTART_COUNT:-0}
child=""
got_signal=""
send=""
forward() {  # SIGNAL-RECEIVED SIGNAL-FOR-FEATSHARD (USR2 and TERM: stop, keep finished chunks)
    got_signal=$1
    send=$2
    note "received SIG$1: featshard stops after leaving durable state"
    if [ -n "$child" ]; then kill -s "$send" "$child" 2>/dev/null || true; fi
}
trap "forward $WARN_SIGNAL USR2" "$WARN_SIGNAL"
trap 'forward TERM TERM' TERM
note "start on $(hostname), restart $restarts of at most $MAX_REQUEUES," \
    "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}"
run_featshard &
child=$!
if [ -n "$got_signal" ]; then kill -s "$send" "$child" 2>/dev/null || true; fi
status=""
while [ -z "$status" ]; do
    wait "$child"
    rc=$?
    # a trapped signal interrupts `wait` (rc > 128) while featshard is still shutting down: wait again
    if [ "$rc" -gt 128 ] && kill -0 "$child" 2>/dev/null; then continue; fi
    status=$rc
done
if [ "$status" -eq 0 ]; then
    note "featshard run finished"
    exit 0
fi
if [ "$got_signal" = "$WARN_SIGNAL" ]; then
    if [ "$restarts" -lt "$MAX_REQUEUES" ]; then
        note "featshard run stopped (exit $status); requeueing this task ($((restarts + 1))/$MAX_REQUEUES)," \
            "it resumes from its finished chunks"
        if scontrol requeue "$task"; then exit "$status"; fi
        note "scontrol requeue failed"
    else
        note "not requeueing: this task was requeued $restarts times already (--max-requeues $MAX_REQUEUES)"
    fi
fi
note "featshard run exited with status $status${got_signal:+ after SIG$got_signal}." \
    "Finished chunks and shards are kept: the state is resumable. $RESUME_HINT"
exit "$status"
"""


def warning_signal(text: str) -> str:
    """'USR2' from --signal '[R:]B:USR2@90' (a name or a number). It must reach the batch shell (B:), which forwards
    it to featshard and requeues the task; TERM is SLURM's own stop signal and cannot be the warning."""
    flags, _, rest = text.rpartition(":")
    sig = rest.split("@")[0].upper()
    try:
        name = signal.Signals(int(sig)).name if sig.isdigit() else signal.Signals["SIG" + sig.removeprefix("SIG")].name
    except (KeyError, ValueError):
        raise UsageError(f"--signal {text!r}: unknown signal {sig!r} (expected e.g. B:USR2@90)") from None
    if "B" not in flags.upper().split(":"):
        raise UsageError(f"--signal {text!r}: use B:{sig}... so the batch script gets the warning and can requeue")
    if name in ("SIGTERM", "SIGKILL", "SIGSTOP", "SIGINT"):
        raise UsageError(f"--signal {text!r}: {name} cannot be the warning signal (choose e.g. USR1 or USR2)")
    return name.removeprefix("SIG")


@dataclass
class JobSpec:
    """Everything the two scripts depend on (paths absolute)."""

    input: str
    out: str
    nodes: int
    gpus_per_node: int
    cpu_workers: int
    python: str
    cpus_per_worker: int
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    mem: str | None = None
    array_parallelism: int | None = None
    signal: str = "B:USR2@90"
    max_requeues: int = 3
    sbatch_args: list[str] = field(default_factory=list)
    run_args: list[str] = field(default_factory=list)
    merge_args: list[str] = field(default_factory=list)
    pythonpath: str | None = None
    exclusive: bool = False  # whole nodes: every CPU of the node instead of cpus_per_worker per device
    merge_gpu: bool = False  # the merge job asks for a GPU and merges on it (else `merge --no-gpu`)
    version: str = __version__

    @property
    def gpus(self) -> str:
        """The `--gpus` each task passes to `run`: its first G visible GPUs, or cpu:W."""
        if self.gpus_per_node == 0:
            return f"cpu:{self.cpu_workers}"
        return "0" if self.gpus_per_node == 1 else f"0-{self.gpus_per_node - 1}"

    @property
    def warn_signal(self) -> str:
        return warning_signal(self.signal)

    @property
    def devices_per_node(self) -> list[str]:
        if self.gpus_per_node == 0:
            return [str(Device("cpu", i)) for i in range(self.cpu_workers)]
        return [str(Device("cuda", i)) for i in range(self.gpus_per_node)]

    @property
    def cpus_per_task(self) -> int:
        return self.cpus_per_worker * len(self.devices_per_node)

    @property
    def slurm_dir(self) -> Path:
        return Path(self.out) / "slurm"


def _directive(option: str, value: object | None = None) -> str:
    if "\n" in option or "\r" in option:
        raise UsageError(f"an #SBATCH line cannot hold a newline: {option!r}")
    if value is None:
        return f"#SBATCH {option}"
    text = str(value)
    if '"' in text or "\n" in text or "\r" in text:
        raise UsageError(f"{option}: a value with a double quote or newline cannot go in an #SBATCH line: {text!r}")
    return f'#SBATCH {option}="{text}"' if any(c.isspace() for c in text) else f"#SBATCH {option}={text}"


def _log_pattern(spec: JobSpec, name: str) -> str:
    return str(spec.slurm_dir / "logs").replace("%", "%%") + "/" + name


def _common(spec: JobSpec) -> list[str]:
    lines = [_directive("--nodes", 1), _directive("--ntasks", 1)]
    for option, value in (("--time", spec.time), ("--partition", spec.partition), ("--account", spec.account),
                          ("--mem", spec.mem)):
        if value:
            lines.append(_directive(option, value))
    return lines


def _header(spec: JobSpec) -> list[str]:
    lines = [f"# Written by featshard {spec.version} (`featshard slurm`); rerun that command to regenerate.", "set -u",
             f"FEATSHARD_PYTHON={shlex.quote(spec.python)}"]
    if spec.pythonpath:
        lines.append(f'export PYTHONPATH={shlex.quote(spec.pythonpath)}"${{PYTHONPATH:+:$PYTHONPATH}}"')
    return lines


def extract_script(spec: JobSpec) -> str:
    """The job array: task r runs `featshard run ... --num-nodes N --node-rank r` and handles the warning signal."""
    array = f"0-{spec.nodes - 1}" + (f"%{spec.array_parallelism}" if spec.array_parallelism else "")
    cpus = _directive("--exclusive") if spec.exclusive else _directive("--cpus-per-task", spec.cpus_per_task)
    lines = ["#!/bin/bash", _directive("--job-name", "featshard-extract"), _directive("--array", array),
             *_common(spec), cpus]
    if spec.gpus_per_node:
        lines.append(_directive("--gres", f"gpu:{spec.gpus_per_node}"))
    lines += [_directive("--signal", spec.signal), _directive("--requeue"), _directive("--open-mode", "append"),
              _directive("--output", _log_pattern(spec, "extract-%A_%a.out")),
              *(_directive(a) for a in spec.sbatch_args), *_header(spec)]
    run = ["-m", "featshard", "run", "--input", spec.input, "--out", spec.out, "--gpus", spec.gpus,
           "--num-nodes", str(spec.nodes)]
    again = "Resume: rerun the same featshard slurm ... --submit (finished shards are skipped), or sbatch --array="
    merge = f" {spec.slurm_dir / 'extract.sbatch'} and then the merge with --dependency=afterok:<that job id>."
    lines += [f"WARN_SIGNAL={spec.warn_signal}", f"MAX_REQUEUES={spec.max_requeues}",
              f'RESUME_HINT={shlex.quote(again)}"$SLURM_ARRAY_TASK_ID"{shlex.quote(merge)}', "run_featshard() {",
              f'    exec "$FEATSHARD_PYTHON" {shlex.join(run)} --node-rank "$SLURM_ARRAY_TASK_ID" '
              f"{shlex.join(spec.run_args)}".rstrip(), "}"]
    return "\n".join(lines) + "\n" + TASK_BODY.lstrip("\n")


def merge_script(spec: JobSpec) -> str:
    """The dependent job: one index from every shard, then `verify`. It asks for the GPU it merges on (or merges
    with --no-gpu), so faiss never takes a GPU of the partition that SLURM did not give it."""
    gpu = [_directive("--gres", "gpu:1")] if spec.merge_gpu else []
    lines = ["#!/bin/bash", _directive("--job-name", "featshard-merge"), *_common(spec),
             _directive("--cpus-per-task", spec.cpus_per_worker), *gpu,
             _directive("--kill-on-invalid-dep", "yes"), _directive("--open-mode", "append"),
             _directive("--output", _log_pattern(spec, "merge-%j.out")),
             *(_directive(a) for a in spec.sbatch_args), *_header(spec), "set -eo pipefail",
             f"\"$FEATSHARD_PYTHON\" -m featshard merge "
             f"{shlex.join([spec.out, '--gpu' if spec.merge_gpu else '--no-gpu', *spec.merge_args])}"]
    lines.append(f"\"$FEATSHARD_PYTHON\" -m featshard verify {shlex.quote(spec.out)}")
    return "\n".join(lines) + "\n"

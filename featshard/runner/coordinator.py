"""`featshard run`: plan shards over the devices, run `extract_shard` on each through a backend, report.

Splits the input into one shard per device (times nodes, under SLURM), hands each shard to the backend, awaits the
results with a timeout (a dead worker is detected and its shard retried from its last durable chunk), and writes
`summary.json`. SIGINT, SIGTERM and SIGUSR2 stop the workers and leave a state the same command resumes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featshard.runner.backends import BACKENDS, Backend, Handle, WorkerDied, make_backend
from featshard.runner.devices import Device, parse_gpus
from featshard.errors import UsageError
from featshard.extract.loader import default_loader_workers
from featshard.store.locks import RunLock
from featshard.store.manifest import write_json_atomic
from featshard.store.plan import Shard, plan_shards
from featshard.runner.prepare import Prepared, prepare, scan, shard_attrs
from featshard.runner.report import summarize, verdict
from featshard.runner.resume import durable_rows
from featshard.runner.runtime import tune_process_env
from featshard.runner.worker import ShardResult, ShardSpec, Stopped

log = logging.getLogger("featshard.run")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class Interrupted(Stopped):
    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}: finished chunks are on disk; "
                         "rerun the same command to resume")
        self.exit_code = 128 + signum


class StopSignals:
    """SIGINT, SIGTERM and SIGUSR2 become `Interrupted`: raised at once while no worker runs; while workers run
    (`polling`), recorded in `received` for the polling loop, which stops the workers first. Later signals are only
    recorded, so a second Ctrl-C cannot cut the clean-up short."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.polling = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        first = not self.received
        self.received.append(signum)
        if first:
            log.warning("received %s: stopping the workers; finished chunks stay on disk",
                        signal.Signals(signum).name)
            if not self.polling:
                raise Interrupted(signum)

    def __enter__(self) -> "StopSignals":
        self._previous = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@dataclass
class Outcome:
    """What `await_all` saw: results, errors, rows found done at the start and at each retry."""

    results: list[ShardResult] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    start_rows: dict[str, int] = field(default_factory=dict)
    retries: dict[str, list[int]] = field(default_factory=dict)  # shard -> durable rows at each retry


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="list file, CSV/TSV/parquet with a 'path' column, a directory, "
                   "or WebDataset tars (a .tar, a folder of *.tar, 'shards/{00000..00099}.tar')")
    p.add_argument("--out", required=True, help="run directory (created; an existing run is resumed)")
    p.add_argument("--gpus", default=None, help="0-7 | 0,2,5 | all | cpu | cpu:N (default: all GPUs, else cpu)")
    p.add_argument("--model", default="resnet50", help="torchvision.models.get_model name (default resnet50), or "
                   "timm:NAME (timm's architecture[.pretrained_tag])")
    p.add_argument("--weights", default="DEFAULT", help="DEFAULT | none | PATH to a state_dict or checkpoint")
    p.add_argument("--layer", default=None, help="graph node to read (default: input of the classifier)")
    p.add_argument("--pool", default="avg", help="avg | max | gem, for spatial maps (default avg)")
    p.add_argument("--no-normalize", action="store_true", help="store raw vectors instead of L2-normalised")
    p.add_argument("--dtype", default="float32", help="stored dtype: float32 | float16")
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16 (auto: fastest accurate one)")
    p.add_argument("--graph", default="auto", choices=("auto", "eager", "jit", "compile"),
                   help="how the network runs: auto (CPU fp32: TorchScript where it measures faster, else eager), "
                   "eager, jit (TorchScript), compile (torch.compile: slow first start, worth it for long runs)")
    p.add_argument("--decode", default="fast", choices=("exact", "fast", "gpu"),
                   help="exact: plain PIL; fast: JPEG draft decode + crop folded into resize (default)")
    p.add_argument("--batch-size", type=int, default=None, help="images per model batch (default 32 CPU, 128 GPU)")
    p.add_argument("--loader-workers", type=int, default=None, help="decode processes per device")
    p.add_argument("--chunk-size", type=int, default=2048, help="rows per durable chunk (resume granularity)")
    p.add_argument("--max-retries", type=int, default=2, help="retries of a shard whose worker died")
    p.add_argument("--retry-failed", action="store_true",
                   help="process again the rows recorded as failed (e.g. after a network mount came back)")
    p.add_argument("--max-pixels", type=int, default=178_956_970, help="refuse images with more pixels")
    p.add_argument("--image-timeout", type=float, default=60.0, help="per-image open+decode deadline, seconds")
    p.add_argument("--seed", type=int, default=0, help="seed for --weights none (same in every worker)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run in --out and start over")
    p.add_argument("--num-nodes", type=int, default=None, help="nodes in the job (default from SLURM, else 1)")
    p.add_argument("--node-rank", type=int, default=None, help="this node's rank (default from SLURM, else 0)")
    p.add_argument("--backend", default=os.environ.get("FEATSHARD_BACKEND", "pool"), choices=BACKENDS,
                   help="pool (default) or inline (in-process, for debugging)")
    p.add_argument("--dry-run", action="store_true", help="print the shard plan and exit")


def node_layout(args: argparse.Namespace) -> tuple[int, int]:
    env = os.environ
    if "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
        nodes, rank = int(env["SLURM_ARRAY_TASK_COUNT"]), int(env["SLURM_ARRAY_TASK_ID"])
    elif "SLURM_NNODES" in env and "SLURM_NODEID" in env and "SLURM_STEP_ID" in env:
        nodes, rank = int(env["SLURM_NNODES"]), int(env["SLURM_NODEID"])
    else:
        nodes, rank = 1, 0
    nodes = args.num_nodes if args.num_nodes is not None else nodes
    rank = args.node_rank if args.node_rank is not None else rank
    if nodes < 1 or not 0 <= rank < nodes:
        raise UsageError(f"--node-rank {rank} is outside 0..{nodes - 1} (--num-nodes {nodes})")
    return nodes, rank


def command(args: argparse.Namespace) -> int:
    devices = parse_gpus(args.gpus)
    nodes, rank = node_layout(args)
    if args.dry_run:
        return dry_run(args, devices, nodes)
    for name in ("batch_size", "loader_workers", "chunk_size", "max_retries"):
        value = getattr(args, name)
        if value is not None and value < (0 if name in ("loader_workers", "max_retries") else 1):
            raise UsageError(f"--{name.replace('_', '-')} {value} is out of range")
    with StopSignals() as stop:
        scanned = scan(args)
        with RunLock(scanned.run_dir, rank):  # before the manifest is read, written or cleared (--overwrite)
            clean_run_tmp(scanned.run_dir, rank, nodes)
            applied = tune_process_env()  # read by the worker processes when they start
            if applied:
                log.debug("worker environment: %s", applied)
            # made now, so the workers start (and import torch) while the model and inputs are checked here
            backend = make_backend(args.backend, len(devices))
            try:
                prepared = prepare(args, devices, nodes, scanned)
                mine = [s for s in prepared.plan if s.node == rank]
                outcome = execute(prepared, mine, devices, args, stop, backend)
            except BaseException:
                t = time.monotonic()
                backend.terminate()
                log.info("workers stopped (%.1f s)", time.monotonic() - t)
                raise
            return finish(prepared, mine, outcome, rank, nodes)


def clean_run_tmp(run_dir: str, rank: int, nodes: int) -> None:
    """Remove the temp files a killed run of this node left next to the manifest, summary and lock (each shard's
    own temp files are its worker's to clean). Other nodes' files are theirs: only node-wide names are touched."""
    root = Path(run_dir)
    names = [f"summary-node-{rank:04d}.json", f"locks/node-{rank:04d}.lock"]
    if nodes == 1:
        names += ["summary.json", "manifest.json"]
    for name in names:
        for path in root.glob(f"{name}.tmp-*"):
            log.info("removing %s, left by an interrupted write", path)
            path.unlink(missing_ok=True)


def dry_run(args: argparse.Namespace, devices: list[Device], nodes: int) -> int:
    from featshard.store.inputs import open_input, scan_input

    rows, sha = scan_input(open_input(args.input))
    plan = plan_shards(rows, [str(d) for d in devices], nodes)
    print(json.dumps({"rows": rows, "input_sha256": sha, "num_nodes": nodes,
                      "plan": [s.to_dict() for s in plan]}, indent=2))
    return 0


def make_specs(p: Prepared, mine: list[Shard], devices: list[Device], args: argparse.Namespace) -> list[ShardSpec]:
    per_device = len(devices)
    loaders = args.loader_workers if args.loader_workers is not None else default_loader_workers(per_device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpu = devices[0].kind == "cuda"
    threads = max(1, cores // per_device) if not gpu else 2
    batch = args.batch_size or (128 if gpu else 32)
    attrs = shard_attrs(p)
    return [ShardSpec(run_dir=p.run_dir, shard=s, source=p.source, model=p.model, prep=p.prep, dtype=p.dtype,
                      batch_size=batch, loader_workers=loaders, chunk_size=p.chunk_size, cpu_threads=threads,
                      attrs=attrs, progress_position=i, retry_failed=args.retry_failed) for i, s in enumerate(mine)]


def execute(p: Prepared, mine: list[Shard], devices: list[Device], args: argparse.Namespace,
            stop: StopSignals, backend: Backend) -> Outcome:
    """Run this node's shards through `backend` (stopped by the caller if this raises)."""
    specs = make_specs(p, mine, devices, args)
    outcome = Outcome(start_rows={s.shard.name: durable_rows(s) for s in specs})
    done = sum(outcome.start_rows.values())
    if done:
        log.info("resuming: %d of %d rows are already done", done, sum(s.shard.rows for s in specs))
    stop.polling = args.backend != "inline"  # inline runs shards in this thread: a signal must interrupt them
    try:
        return await_all(backend, specs, args.max_retries, stop.received, outcome)
    finally:
        stop.polling = False


def await_all(backend: Backend, specs: list[ShardSpec], max_retries: int, stop: list[int],
              outcome: Outcome) -> Outcome:
    """Submit every shard, then poll: collect results, retry dead workers, stop on a signal. Never blocks forever."""
    pending: dict[str, Handle] = {s.shard.name: backend.submit(s) for s in specs}
    while pending:
        for name, handle in list(pending.items()):
            if stop:
                raise Interrupted(stop[0])
            try:
                outcome.results.append(handle.result(timeout=0.5))
                del pending[name]
            except TimeoutError:
                continue
            except WorkerDied as exc:
                del pending[name]
                retry = _retry(backend, handle.spec, exc, max_retries, outcome)
                if retry is not None:
                    pending[name] = retry
            except Stopped:
                raise
            except Exception as exc:  # noqa: BLE001 - report the shard, keep the others going
                del pending[name]
                outcome.errors[name] = f"{type(exc).__name__}: {exc}"
                log.error("%s failed: %s", name, outcome.errors[name])
                log.debug("%s traceback", name, exc_info=exc)
    backend.close()
    if stop:
        log.warning("every shard had finished when %s came: the run is complete", signal.Signals(stop[0]).name)
    outcome.results.sort(key=lambda r: r.index)
    return outcome


def _retry(backend: Backend, spec: ShardSpec, exc: WorkerDied, max_retries: int, outcome: Outcome) -> Handle | None:
    """Resubmit a shard whose worker died (it resumes from its finished chunks), or record it as failed."""
    name = spec.shard.name
    tries = outcome.retries.setdefault(name, [])
    if len(tries) >= max_retries:
        outcome.errors[name] = f"{exc} (after {len(tries)} retries)" if tries else str(exc)
        return None
    tries.append(durable_rows(spec))
    log.warning("%s; retry %d/%d resumes from its last finished chunk (%d of %d rows done)", exc, len(tries),
                max_retries, tries[-1], spec.shard.rows)
    return backend.submit(spec)


def finish(p: Prepared, mine: list[Shard], outcome: Outcome, rank: int, nodes: int) -> int:
    summary = summarize(p, mine, outcome.results, outcome.errors, outcome.start_rows, outcome.retries)
    name = "summary.json" if nodes == 1 else f"summary-node-{rank:04d}.json"
    try:
        write_json_atomic(os.path.join(p.run_dir, name), summary)
    except OSError as exc:
        log.error("cannot write %s: %s", os.path.join(p.run_dir, name), exc)
    log.info("%s", verdict(summary))
    if outcome.errors:
        for shard, err in outcome.errors.items():
            log.error("shard %s did not complete: %s", shard, err)
        log.error("run incomplete: %d of %d shards failed; rerun the same command to resume", len(outcome.errors),
                  len(mine))
        return 1
    log.info("run complete: %d rows, %d ok, %d failed, %.1f images/s -> %s", summary["rows"], summary["ok"],
             summary["failed"], summary["images_per_s"], p.run_dir)
    if summary.get("retried_rows"):
        log.info("--retry-failed: %d of %d retried rows now have a feature", summary["recovered_rows"],
                 summary["retried_rows"])
    return 0

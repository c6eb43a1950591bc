"""`featshard run`: plan shards over the devices, run `extract_shard` on each through a backend, report.

`run_job(config)` checks everything it can before spending (config, devices, input, out dir, lock, manifest, model
probe: see featshard.runner.prepare), then hands each unfinished shard to the backend (a Pool is started only when
there is work), awaits the results with a timeout (a dead worker is detected and its shard retried from its last
durable chunk), and writes `summary.json`. SIGINT, SIGTERM and SIGUSR2 stop the workers and leave a state the same
command resumes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass, field

from featshard.errors import UsageError
from featshard.extract.loader import loader_split, plan_shm
from featshard.logs import setup_logging
from featshard.runner.backends import check_backend, make_backend
from featshard.runner.handles import Backend, Handle, LogRoute, WorkerDied
from featshard.runner.config import RunConfig
from featshard.runner.devices import Device, parse_gpus
from featshard.runner.display import FINAL, RunDisplay, quiet_logs
from featshard.runner.logroute import LogListener
from featshard.runner.prepare import Prepared, prepare, scan, shard_attrs
from featshard.runner.report import RunIncomplete, RunSummary, summarize, verdict
from featshard.runner.resume import clean_stale, durable_rows
from featshard.runner.runtime import tune_process_env
from featshard.runner.signals import Interrupted, StopSignals
from featshard.runner.status import age
from featshard.runner.shardspec import ShardFault, ShardResult, ShardSpec, Stopped
from featshard.runner.worker import finished_result
from featshard.store.atomic import TMP_MARK, write_json_atomic
from featshard.store.locks import RunLock
from featshard.store.plan import Shard, plan_shards
from featshard.store.progress import mark_stopped
from featshard.store.rundir import RunDir
from featshard.store.shards import is_complete
from featshard.system import cores

log = logging.getLogger("featshard.run")


@dataclass
class Outcome:
    """What `await_all` saw: results, errors, rows found done at the start and at each retry."""

    results: list[ShardResult] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    start_rows: dict[str, int] = field(default_factory=dict)
    retries: dict[str, list[int]] = field(default_factory=dict)  # shard -> durable rows at each retry


def node_layout(config: RunConfig) -> tuple[int, int]:
    env = os.environ
    if "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
        nodes, rank = int(env["SLURM_ARRAY_TASK_COUNT"]), int(env["SLURM_ARRAY_TASK_ID"])
    elif "SLURM_NNODES" in env and "SLURM_NODEID" in env and "SLURM_STEP_ID" in env:
        nodes, rank = int(env["SLURM_NNODES"]), int(env["SLURM_NODEID"])
    else:
        nodes, rank = 1, 0
    nodes = config.num_nodes if config.num_nodes is not None else nodes
    rank = config.node_rank if config.node_rank is not None else rank
    if nodes < 1 or not 0 <= rank < nodes:
        raise UsageError(f"--node-rank {rank} is outside 0..{nodes - 1} (--num-nodes {nodes})")
    return nodes, rank


def run_job(config: RunConfig) -> RunSummary:
    """`featshard run` as a function: returns the summary, raises RunIncomplete (some shard failed), Interrupted
    (a stop signal), UsageError/FeatshardError (refused before any work)."""
    refuse_in_starting_worker()
    started = time.monotonic()
    devices = parse_gpus(config.gpus)
    check_backend(config.backend, devices)
    nodes, rank = node_layout(config)
    if config.dry_run:
        return dry_run(config, devices, nodes)
    if not logging.getLogger().handlers:  # a script calling featshard.run() without logging set up: show the run's
        setup_logging()
    with StopSignals() as stop, quiet_logs(config.quiet):
        scanned = scan(config)
        with RunLock(scanned.run_dir, rank):  # before the manifest is read, written or cleared (--overwrite)
            clean_run_tmp(scanned.run_dir, rank, nodes)
            prepared = prepare(config, devices, nodes, scanned)
            mine = [s for s in prepared.plan if s.node == rank]
            label = f"node {rank}/{nodes}" if nodes > 1 else f"{len(devices)} device{'s' * (len(devices) > 1)}"
            outcome = execute(make_specs(prepared, mine, devices, config), config, len(devices), stop, label)
            return finish(prepared, mine, outcome, rank, nodes, time.monotonic() - started)


def refuse_in_starting_worker() -> None:
    """A worker process re-imports the caller's script while it starts (spawn): a run started from there is a
    script without a main guard, which would start workers forever."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise UsageError("featshard.run called while a worker process starts: the script calls it at import time; "
                         "put the call under `if __name__ == \"__main__\":`")


def clean_run_tmp(run_dir: str, rank: int, nodes: int) -> None:
    """Remove the temp files a killed run of this node left next to the manifest, summary and lock (each shard's
    own temp files are its worker's to clean). Other nodes' files are theirs: only node-wide names are touched."""
    paths = RunDir(run_dir)
    targets = [paths.summary(rank, nodes), paths.lock(rank)] + ([paths.manifest] if nodes == 1 else [])
    for target in targets:
        for path in target.parent.glob(f"{target.name}{TMP_MARK}*"):
            log.info("removing %s, left by an interrupted write", path)
            path.unlink(missing_ok=True)


def dry_run(config: RunConfig, devices: list[Device], nodes: int) -> RunSummary:
    from featshard.store.inputs import open_input, scan_input

    rows, sha = scan_input(open_input(config.input))
    plan = plan_shards(rows, [str(d) for d in devices], nodes)
    return RunSummary(run_dir=os.path.abspath(config.out), rows=rows, input_sha256=sha, num_nodes=nodes,
                      plan=[s.to_dict() for s in plan], dry_run=True)


def make_specs(p: Prepared, mine: list[Shard], devices: list[Device], config: RunConfig) -> list[ShardSpec]:
    per_device = len(devices)
    loaders, split = loader_split(per_device)
    if config.loader_workers is not None:
        loaders = config.loader_workers
    else:
        log.info("loaders: %s", split)
    gpu = devices[0].kind == "cuda"
    threads = max(1, cores() // per_device) if not gpu else 2
    batch = config.batch_size or (256 if gpu else 32)
    shm = plan_shm(per_device, loaders, p.prep, batch)  # sized to the free /dev/shm, or refused saying why
    attrs = shard_attrs(p)
    return [ShardSpec(run_dir=p.run_dir, shard=s, source=p.source, model=p.model, prep=p.prep, dtype=p.dtype,
                      batch_size=batch, loader_workers=shm.loaders, chunk_size=p.chunk_size, cpu_threads=threads,
                      attrs=attrs, retry_failed=config.retry_failed, prefetch=shm.prefetch)
            for s in mine]


def execute(specs: list[ShardSpec], config: RunConfig, processes: int, stop: StopSignals, label: str = "") -> Outcome:
    """Run the shards that have work left through a backend made for them (none: no backend, no worker), under the
    run's display; the workers' log records come here (the pool's workers send them to a LogListener)."""
    outcome = Outcome(start_rows={s.shard.name: durable_rows(s) for s in specs})
    done = sum(outcome.start_rows.values())
    todo = [s for s in specs if config.retry_failed or not is_complete(RunDir(s.run_dir).shard(s.shard.name))]
    if done:
        log.info("resuming: %d of %d rows are already done", done, sum(s.shard.rows for s in specs))
    for spec in specs:
        if spec not in todo:
            clean_stale(spec)  # what a kill between its final rename and the clean-up left
            outcome.results.append(finished_result(spec))
    if not todo:
        return outcome
    applied = tune_process_env()  # read by the worker processes when they start
    if applied:
        log.debug("worker environment: %s", applied)
    level = logging.WARNING if config.quiet else logging.getLogger().getEffectiveLevel()
    with RunDisplay([s.shard for s in specs], specs[0].run_dir, outcome.retries, config.progress_every,
                    config.quiet, label or "all"), LogListener() as listener:
        backend = make_backend(config.backend, min(processes, len(todo)), config.stall_timeout,
                               LogRoute(listener.address, level))
        stop.polling = config.backend != "inline"  # inline runs shards in this thread: a signal must interrupt them
        try:
            return await_all(backend, todo, config.max_retries, stop.received, outcome)
        except BaseException:
            t = time.monotonic()
            backend.terminate()
            killed = [s.shard.name for s in todo if mark_stopped(s.run_dir, s.shard.name, "killed: it did not stop "
                                                                  "within the grace period after the stop")]
            log.info("workers stopped (%.1f s)%s", time.monotonic() - t,
                     f"; killed before they could unwind: {', '.join(killed)}" if killed else "")
            raise
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
            except (WorkerDied, ShardFault) as exc:  # died, stalled, or a CUDA fault: retry from durable chunks
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


def _retry(backend: Backend, spec: ShardSpec, exc: Exception, max_retries: int, outcome: Outcome) -> Handle | None:
    """Resubmit a shard whose worker died (it resumes from its finished chunks), or record it as failed."""
    name = spec.shard.name
    tries = outcome.retries.setdefault(name, [])
    if len(tries) >= max_retries:
        outcome.errors[name] = f"{exc} (after {len(tries)} retries)" if tries else str(exc)
        return None
    tries.append(durable_rows(spec))
    log.warning("%s; retry %d/%d resumes from its last finished chunk (%d of %d rows done)", exc, len(tries),
                max_retries, tries[-1], spec.shard.rows)
    return backend.submit(dataclasses.replace(spec, retries=len(tries)))


def final_figures(summary: RunSummary, wall: float) -> str:
    """The final line's figures: rows, ok, failed, the command's wall time and the rows it processed per second."""
    resumed = f", {summary.resumed_rows} resumed" if summary.resumed_rows else ""
    rate = summary.processed_rows / wall if wall > 0 else 0.0
    return (f"{summary.rows} rows, {summary.ok} ok, {summary.failed} failed{resumed} in {age(wall)}, "
            f"{rate:.1f} images/s")


def finish(p: Prepared, mine: list[Shard], outcome: Outcome, rank: int, nodes: int, wall: float = 0.0) -> RunSummary:
    """summary.json, the verdict and the final line (rows, ok, failed, the command's wall time, its images/s)."""
    summary = summarize(p, mine, outcome.results, outcome.errors, outcome.start_rows, outcome.retries)
    path = RunDir(p.run_dir).summary(rank, nodes)
    try:
        write_json_atomic(path, summary.to_dict())
    except OSError as exc:
        log.error("cannot write %s: %s", path, exc)
    log.info("%s", verdict(summary))
    if outcome.errors:
        for shard, err in outcome.errors.items():
            log.error("shard %s did not complete: %s", shard, err)
        raise RunIncomplete(f"run incomplete: {len(outcome.errors)} of {len(mine)} shards failed; "
                            f"{final_figures(summary, wall)}; rerun the same command to resume", summary)
    log.info("run complete: %s -> %s", final_figures(summary, wall), p.run_dir, extra=FINAL)
    if summary.retried_rows:
        log.info("--retry-failed: %d of %d retried rows now have a feature", summary.recovered_rows,
                 summary.retried_rows)
    return summary

"""The pool backend: a spawn-context `multiprocessing.Pool`, one non-daemonic worker process per device (each runs one
shard, then is replaced), watched through the shards' progress files: a SIGKILLed worker is `WorkerDied`, one that
stopped updating past the stall timeout is stopped and `WorkerStalled`, workers that cannot even start (a script
without a main guard) are `WorkersCannotStart`; stopping never blocks on the pool's own bookkeeping."""
from __future__ import annotations

import importlib
import logging
import multiprocessing
import multiprocessing.pool
import os
import signal
import time
import uuid
from dataclasses import replace
from typing import Any, Callable

from featshard.runner.handles import LogRoute, WorkerDied, WorkersCannotStart, WorkerStalled
from featshard.runner.logroute import route_to
from featshard.runner.shardspec import ShardResult, ShardSpec
from featshard.runner.worker import extract_shard
from featshard.store.progress import read_progress
from featshard.system import pid_alive

log = logging.getLogger("featshard.runner.pool")
PRELOAD = ("torch", "torchvision")


class _NoDaemonProcess(multiprocessing.get_context("spawn").Process):  # type: ignore[misc]
    """Pool workers are daemonic by default, and daemonic processes may not start DataLoader workers."""

    spawned = 0  # worker processes this (coordinator) process has started

    def start(self) -> None:
        type(self).spawned += 1
        super().start()

    @property
    def daemon(self) -> bool:
        return False

    @daemon.setter
    def daemon(self, value: bool) -> None:
        pass


class _SpawnNoDaemonContext(type(multiprocessing.get_context("spawn"))):  # type: ignore[misc]
    Process = _NoDaemonProcess


def _worker_init(preload: tuple[str, ...] = (), preloads_left: Any = None, started: Any = None,
                 logs: LogRoute | None = None) -> None:
    me = multiprocessing.current_process()
    me.name = f"worker-{me.name.rsplit('-', 1)[-1]}"  # in log lines: not the pool's _NoDaemonPoolWorker-N
    if logs is not None:  # first: a record from here on reaches the coordinator's terminal through it
        route_to(logs.address, logs.level)
    if started is not None:  # this worker got through its start-up (the re-import of the caller's __main__)
        with started.get_lock():
            started.value += 1
    # The coordinator owns Ctrl-C: it stops workers itself and tells the user how to resume.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Its stop is a SIGTERM: unwind (the current batch is dropped, loader processes are shut down, the progress
    # file says "stopped") instead of vanishing; finished chunks are already durable.
    signal.signal(signal.SIGTERM, _stop_worker)
    # Loader processes forked from here keep the default: a SIGTERM must end one even while it is stuck in a read
    # that only a fatal signal interrupts (a stalled network mount), which a Python handler never gets to run for.
    os.register_at_fork(after_in_child=_default_sigterm)
    if preloads_left is not None:  # only the first workers: a replacement (after a shard) may never get a task
        with preloads_left.get_lock():
            preload, preloads_left.value = (preload, preloads_left.value - 1) if preloads_left.value > 0 else ((), 0)
    for module in preload:  # importing torch does not initialise CUDA: pin_device still comes first
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - a failing initializer makes a Pool respawn workers forever; the shard
            pass  # itself imports it again and fails with the real error, which the coordinator reports


def _stop_worker(signum: int, _frame: Any) -> None:
    import threading

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
    if not threading.main_thread().is_alive():  # the interpreter is exiting (its atexit callbacks run): nothing to
        os._exit(128 + signum)  # unwind, and a SystemExit there is only printed ("Exception ignored in atexit ...")
    raise SystemExit(128 + signum)


def _default_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class PoolHandle:
    def __init__(self, spec: ShardSpec, async_result: Any, grace: float, start_timeout: float,
                 stall_timeout: float = 0.0, cannot_start: Callable[[], bool] = lambda: False) -> None:
        self.spec, self._ar, self._cannot_start = spec, async_result, cannot_start
        self._submitted = time.time()
        self._grace, self._start_timeout, self._stall_timeout = grace, start_timeout, stall_timeout
        self._dead_since: float | None = None

    def result(self, timeout: float | None = None) -> ShardResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._ar.ready():
                return self._ar.get()
            self._check_alive()
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(self.spec.shard.name)
            self._ar.wait(0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic())))

    def _check_alive(self) -> None:
        prog = read_progress(self.spec.run_dir, self.spec.shard.name)
        pid = prog.get("pid") if prog and prog.get("attempt") == self.spec.attempt else None  # not a killed run's
        if pid is None:
            if self._cannot_start():
                raise WorkersCannotStart(
                    "the worker processes die while starting, before any shard: their start-up re-imports the "
                    "script that called featshard.run (spawn); call it under `if __name__ == \"__main__\":` (see "
                    "the workers' error above)")
            if time.time() - self._submitted > self._start_timeout:
                raise WorkerDied(f"{self.spec.shard.name}: no worker started it within {self._start_timeout:.0f} s")
            return
        if pid_alive(int(pid)):
            self._dead_since = None
            self._check_progress(int(pid), prog or {})
            return
        self._dead_since = self._dead_since or time.monotonic()
        if time.monotonic() - self._dead_since > self._grace and not self._ar.ready():
            raise WorkerDied(f"{self.spec.shard.name}: worker pid {pid} on {self.spec.shard.device} died "
                             "(killed, out of memory or crashed) before finishing")



    def _check_progress(self, pid: int, prog: dict[str, Any]) -> None:
        """Stop a live worker whose progress file is older than the stall timeout, and say so."""
        age = time.time() - float(prog.get("updated") or prog.get("started") or time.time())
        if not self._stall_timeout or age <= self._stall_timeout or self._ar.ready():
            return
        name = self.spec.shard.name
        log.error("%s: worker pid %d on %s has not updated its progress for %.0f s (stage %r; --stall-timeout %g): "
                  "stopping it", name, pid, self.spec.shard.device, age, prog.get("stage"), self._stall_timeout)
        stop_pid(pid, self._grace)
        raise WorkerStalled(f"{name}: worker pid {pid} on {self.spec.shard.device} stalled (no progress for "
                            f"{age:.0f} s in stage {prog.get('stage')!r}, --stall-timeout {self._stall_timeout:g}) and "
                            "was stopped")


def stop_pid(pid: int, grace: float) -> None:
    """SIGTERM (the worker unwinds and marks its progress stopped), then SIGKILL after `grace` s: a process stuck
    in a driver call or stopped never runs its handler."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.1)
    log.warning("worker pid %d is still there after SIGKILL (uninterruptible I/O?); retrying its shard anyway", pid)


class PoolBackend:
    """A spawn-context Pool, one process per device; each process runs one shard and is then replaced
    (maxtasksperchild=1), so every shard starts in a fresh process that pins its device before CUDA starts."""

    def __init__(self, processes: int, grace: float = 3.0, start_timeout: float = 600.0,
                 preload: tuple[str, ...] = PRELOAD, stall_timeout: float = 0.0,
                 logs: LogRoute | None = None) -> None:
        """`preload`: modules each worker imports as soon as it starts, before it gets a shard (the pool is made
        early, so the workers' `import torch`, ~5 s on the 2-core box, overlaps with the coordinator's checks).
        `logs`: where the workers' log records go (None: their own stderr)."""
        ctx = _SpawnNoDaemonContext()
        left = ctx.Value("i", max(1, processes))  # each shard's replacement worker would import torch for nothing
        self._started, self._processes, self._spawned_before = ctx.Value("i", 0), processes, _NoDaemonProcess.spawned
        self._pool: Any = multiprocessing.pool.Pool(processes=max(1, processes), initializer=_worker_init,
                                               initargs=(preload, left, self._started, logs), maxtasksperchild=1,
                                               context=ctx)
        self._grace, self._start_timeout, self._stall_timeout = grace, start_timeout, stall_timeout

    def cannot_start(self) -> bool:
        """No worker ever got through its start-up while the pool has had to replace every one of them twice."""
        spawned = _NoDaemonProcess.spawned - self._spawned_before
        return self._started.value == 0 and spawned > 3 * max(1, self._processes)

    def submit(self, spec: ShardSpec) -> PoolHandle:
        def on_error(exc: BaseException) -> None:
            log.error("%s failed in its worker: %s: %s", spec.shard.name, type(exc).__name__, exc)

        spec = replace(spec, attempt=uuid.uuid4().hex)
        ar = self._pool.apply_async(extract_shard, (spec,), error_callback=on_error)
        return PoolHandle(spec, ar, self._grace, self._start_timeout, self._stall_timeout, self.cannot_start)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers once every result is in. They are idle then (each finished its one shard; the pool
        has started fresh replacements, importing torch), so they are stopped rather than waited for. A task whose
        worker was killed never completes, and a plain Pool then waits for it forever (join, and even interpreter
        exit): that case is stopped the same way."""
        if not self._pool._cache:  # noqa: SLF001 - every result is in: the workers hold nothing worth unwinding
            for proc in multiprocessing.active_children():
                if isinstance(proc, _NoDaemonProcess) and proc.exitcode is None:
                    proc.kill()
        self.terminate(timeout)

    def terminate(self, timeout: float = 5.0) -> None:
        """Stop every worker now (finished chunks are durable), never blocking on the pool's own bookkeeping."""
        pool = self._pool
        # Stop the pool from replacing the workers we are about to stop (it repopulates while tasks are pending).
        pool._state = multiprocessing.pool.TERMINATE  # noqa: SLF001
        pool._worker_handler._state = multiprocessing.pool.TERMINATE  # noqa: SLF001
        pool._change_notifier.put(None)  # noqa: SLF001
        _bounded(pool._worker_handler.join, timeout)  # noqa: SLF001
        workers = [p for p in multiprocessing.active_children() if isinstance(p, _NoDaemonProcess)]
        _stop_processes(workers, timeout)
        if all(p.exitcode is not None for p in workers):
            _free_queue_locks(pool)
        if not _bounded(pool.terminate, timeout):
            log.warning("pool did not shut down cleanly; its workers are gone, leaving it")
            pool._terminate.cancel()  # noqa: SLF001 - its exit-time finalizer would block the same way


def _free_queue_locks(pool: Any) -> None:
    """Every worker is gone: a queue lock still held was held by a worker killed while it held it (an idle worker
    waits for a task holding the task queue's read lock; one sending its result holds the result queue's write lock
    until just after the coordinator may have read that result). `pool.terminate` takes both locks: it would wait
    forever. Only workers take these two (the pool's own threads take the other end's)."""
    for lock in (pool._inqueue._rlock, pool._outqueue._wlock):  # noqa: SLF001
        if lock is not None:
            lock.acquire(block=False)  # taken now, by us or (dead) by a worker: either way free it
            lock.release()


def _stop_processes(procs: list[Any], timeout: float) -> None:
    for proc in procs:
        if proc.exitcode is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.exitcode is None:
            proc.kill()
            proc.join(1.0)


def _bounded(fn: Callable[[], Any], timeout: float) -> bool:
    """Run fn in a daemon thread; True if it returned within timeout."""
    import threading

    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive()

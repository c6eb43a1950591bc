"""The run's one live display, drawn by the coordinator only, from the workers' progress files.

Its figures are `featshard status`'s (featshard.runner.status: `shard_status` per shard, `totals` over them, the
rates being the workers' images/s over their last minute), read by a thread every half second, so the display also
moves while the inline backend runs a shard in the coordinator's own thread.

- Terminal (stderr is a TTY, or a notebook): one overall bar (rows done/total, %, images/s, ETA, elapsed, failed) and
  one line per device (its shard, rows, images/s, ETA, elapsed, failed, state and stage: waiting, loading model,
  extracting, retrying failed rows, finalizing, complete, failed, restarting after its worker died, with the retry
  count). Log records of the coordinator and of every worker (featshard.runner.logroute) print above it, whole.
- No terminal (a log file, CI, `nohup`, SLURM): the plain log lines as ever, plus one line with the same figures every
  `--progress-every` seconds.
- `--quiet` (`quiet_logs`): only warnings, errors and the final line (a record logged with `extra=FINAL`).

rich, not tqdm: rich's Live display owns a region of the terminal and redraws it as a whole; `rich.progress.Progress`
renders its tasks as one table, so the devices' columns line up; the display redirects this process's stderr, so every
log line (ours, the workers' routed here, a library's warning, a user's own handler's) prints above it, whole; its
columns compose (bar, M/N, percentage and elapsed are rich's; rate, ETA, failed and state read the status figures),
and its console knows when stderr is not a terminal or is a notebook. tqdm draws one bar per instance at a fixed
position and prints above them only what goes through `tqdm.write`: that is how the worker's own bars cut log lines.
"""
from __future__ import annotations

import importlib.util
import logging
import socket
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TaskProgressColumn,
                           TextColumn, TimeElapsedColumn)
from rich.table import Column
from rich.text import Text

from featshard.runner.status import age, figures, shard_status, totals
from featshard.store.plan import Shard

log = logging.getLogger("featshard.progress")
FINAL = {"final": True}  # `log.info(..., extra=FINAL)`: the run's last line, printed even with --quiet
STYLES = {"running": "green", "finalizing": "cyan", "complete": "blue", "starting": "yellow", "waiting": "yellow",
          "restarting": "yellow", "pending": "yellow", "failed": "bold red", "stale": "bold red", "stopped": "magenta",
          "incomplete": "red"}


class _Rate(ProgressColumn):
    """images/s of the workers over their last minute (the status figure)."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True, justify="right"))

    def render(self, task: Task) -> Text:
        rate = task.fields.get("rate") or 0.0
        return Text(f"{rate:,.1f} img/s" if rate else "- img/s", style="progress.data.speed")


class _Eta(ProgressColumn):
    """`eta H:MM:SS` (as rich shows elapsed time) from the status figures, `done` once a task is."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True, justify="right"))

    def render(self, task: Task) -> Text:
        eta = task.fields.get("eta")
        text = "done" if task.finished else "eta -:--:--" if eta is None else f"eta {timedelta(seconds=int(eta))}"
        return Text(text, style="progress.remaining")


def columns() -> list[ProgressColumn]:
    def text(fmt: str, **kw: Any) -> TextColumn:
        return TextColumn(fmt, table_column=Column(no_wrap=True, overflow="ellipsis"), **kw)

    dot = text("•", style="dim")
    return [text("{task.description}"), BarColumn(bar_width=None), MofNCompleteColumn(), TaskProgressColumn(), dot,
            _Rate(), dot, _Eta(), dot, TimeElapsedColumn(), dot, text("{task.fields[failed]} failed"), dot,
            text("{task.fields[state]}")]


class RunDisplay:
    """`with RunDisplay(shards, run_dir, retries, every=30, quiet=False, label="2 devices"):` around the run's
    workers. `retries` is the coordinator's own record (shard -> one entry per restart), read as it grows."""

    def __init__(self, shards: list[Shard], run_dir: str, retries: dict[str, list[int]], every: float = 30.0,
                 quiet: bool = False, label: str = "all", interval: float = 0.5, stale_after: float = 300.0,
                 console: Console | None = None) -> None:
        self.shards, self.run_dir, self.retries = shards, run_dir, retries
        self.every, self.interval, self.stale_after = every, interval, stale_after
        console = console or Console(stderr=True)
        terminal = (console.is_terminal and not console.is_dumb_terminal) or (
            console.is_jupyter and importlib.util.find_spec("ipywidgets") is not None)  # rich draws in a widget
        self.mode = "quiet" if quiet else "live" if terminal else "plain"
        self.progress = Progress(*columns(), console=console, disable=self.mode != "live", expand=True,
                                 redirect_stdout=False, redirect_stderr=True, refresh_per_second=4)
        blank: dict[str, Any] = {"rate": 0.0, "eta": None, "failed": 0, "state": ""}
        self.overall = self.progress.add_task(f"[bold]{escape(label)}", total=sum(s.rows for s in shards), **blank)
        self.tasks: dict[str, TaskID] = {
            s.name: self.progress.add_task(escape(f"{s.device} {s.name}"), total=s.rows, **blank) for s in shards}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="featshard-display", daemon=True)
        self._swapped: list[tuple[logging.StreamHandler[Any], Any]] = []
        self.started = time.time()
        self.last: dict[str, Any] = {}

    def __enter__(self) -> "RunDisplay":
        self.started = time.time()
        self.update()
        if self.mode == "live":
            before = sys.stderr
            self.progress.start()
            self._through_display(before)
        if self.mode == "live" or (self.mode == "plain" and self.every > 0):
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._update_safely()  # the final figures stay on the screen
        self.progress.stop()
        for handler, stream in self._swapped:
            handler.setStream(stream)

    def _through_display(self, before: Any) -> None:
        """A logging handler that holds the terminal's stderr itself (a user's own set-up, say) writes through the
        display from now on, like everything that writes to sys.stderr (rich redirected it)."""
        if sys.stderr is before:
            return
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is before:
                self._swapped.append((handler, handler.setStream(sys.stderr)))

    def _watch(self) -> None:
        next_line = time.monotonic() + self.every
        while not self._stop.wait(self.interval):
            if self._update_safely() and self.mode == "plain" and time.monotonic() >= next_line:
                next_line = time.monotonic() + self.every
                log.info("%s", self.line())

    def _update_safely(self) -> bool:
        try:
            self.update()
            return True
        except Exception as exc:  # noqa: BLE001 - the display must never stop the run nor hide its error
            log.debug("display update failed: %s", exc, exc_info=exc)
            return False

    def update(self) -> None:
        """Read the shards' status and move the bars."""
        now, host = time.time(), socket.gethostname()
        rows = [self._seen(shard_status(self.run_dir, s.to_dict(), now, self.stale_after, host)) for s in self.shards]
        t = totals(rows, sum(s.rows for s in self.shards))
        self.last = {"rows": rows, "totals": t}
        for row in rows:
            self.progress.update(self.tasks[row["shard"]], completed=row["rows_done"], rate=row["images_per_s"],
                                 eta=row["eta_s"], failed=row["failed"], state=state_text(row))
        states = ", ".join(f"{n} {k}" for k, n in sorted(t["states"].items()))
        rate = sum(r["images_per_s"] for r in rows) if t["complete"] else t["images_per_s"]  # at the end: all of them
        self.progress.update(self.overall, completed=t["rows_done"], rate=rate, eta=t["eta_s"], failed=t["failed"],
                             state=escape(states))

    def _seen(self, row: dict[str, Any]) -> dict[str, Any]:
        """What the coordinator knows better than the file: a progress file older than this run is an earlier
        run's (its worker has not started yet); a shard it restarted after a worker died is restarting until the new
        worker writes."""
        restarts = len(self.retries.get(row["shard"], ()))
        if row["state"] == "complete":
            return row
        if restarts > row["retries"] and row["state"] != "failed":
            row.update(state="restarting", stage=f"retry {restarts}", rows_done=row["durable"], images_per_s=0.0,
                       eta_s=None)
        elif row["started"] is None or row["started"] < self.started - 1:
            row.update(state="waiting", stage="starting a worker", rows_done=row["durable"], images_per_s=0.0,
                       eta_s=None, retries=restarts, error=None)
        return row

    def line(self) -> str:
        """The plain progress line: the figures of the whole node, then each device's."""
        t = self.last["totals"]
        devices = ", ".join(f"{r['device']} {r['rows_done']}/{r['rows_total']} {doing(r)}"
                            + (f" {r['images_per_s']:.1f} img/s" if r["images_per_s"] else "")
                            for r in self.last["rows"])
        return f"{figures(t)}, {age(time.time() - self.started)} elapsed; {devices}"


def doing(row: dict[str, Any]) -> str:
    """A shard's state in a word or two: its stage while it runs, else its state."""
    if row["state"] in ("running", "waiting", "restarting") and row.get("stage"):
        return str(row["stage"])
    return str(row["state"])


def state_text(row: dict[str, Any]) -> str:
    """A device line's state (rich markup): stage or state, coloured by state; retries; a failure's error."""
    text = f"[{STYLES.get(row['state'], 'white')}]{escape(doing(row))}[/]"
    if row.get("retries"):
        text += f" · retry {row['retries']}"
    if row["state"] in ("failed", "stale") and row.get("error"):  # stopped: the run says why
        text += f" · {escape(str(row['error']))}"
    return text


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or bool(getattr(record, "final", False))


@contextmanager
def quiet_logs(enabled: bool) -> Iterator[None]:
    """--quiet: the root logger's handlers pass only warnings, errors and the final line while the run lasts."""
    if not enabled:
        yield
        return
    quiet, handlers = _Quiet(), list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)

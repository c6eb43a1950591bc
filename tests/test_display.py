"""The run's display (featshard/runner/display.py), with the log routing it relies on (test_logroute.py).

Unit tests read a synthetic run; the end-to-end tests run the real CLI with two CPU workers: under a pseudo-terminal
(the screen, as a terminal shows it, read with pyte: one overall bar at the total, one line per device, every log line
whole, the warning of a worker SIGKILLed afterwards still there), with no terminal (plain progress lines), and
with --quiet.
"""
from __future__ import annotations

import io
import logging
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import FAST, cli, make_images, write_list
from rich.console import Console

from featshard.errors import UsageError
from featshard.runner.config import RunConfig
from featshard.runner.display import FINAL, RunDisplay, quiet_logs
from featshard.store.atomic import write_json_atomic
from featshard.store.manifest import write_manifest
from featshard.store.plan import plan_shards
from featshard.store.rundir import RunDir
from featshard.store.shards import Block, write_block

import numpy as np

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ \S+: ")


# ---- the display over a synthetic run -------------------------------------------------------------------------------
def write_progress(run: Path, name: str, **fields: Any) -> None:
    base = {"shard": name, "pid": os.getpid(), "host": socket.gethostname(), "device": "cpu:0", "state": "running",
            "stage": "extracting", "rows_total": 10, "rows_done": 0, "ok": 0, "failed": 0, "images_per_s": 0.0,
            "retries": 0, "started": time.time(), "updated": time.time(), "error": None}
    write_json_atomic(RunDir(run).progress(name), {**base, **fields})


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Path, list[Any]]:
    """4 shards of 10 rows on cpu:0..3: 0 complete (1 failed row), 1 extracting, 2 not started, 3 failed."""
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    plan = plan_shards(40, ["cpu:0", "cpu:1", "cpu:2", "cpu:3"])
    write_manifest(run, {"rows": 40, "fingerprint": "f00d", "plan": [s.to_dict() for s in plan]})
    ok = [r for r in range(10) if r != 3]
    write_block(RunDir(run).shard(plan[0].name), Block(np.asarray(ok, np.int64), [f"{r}" for r in ok],
                np.ones((9, 4), np.float32), np.asarray([3], np.int64), ["3"], ["corrupt: x"]), {}, 4, "float32")
    return run, plan


def render(display: RunDisplay, width: int = 160) -> list[str]:
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(display.progress.make_tasks_table(display.progress.tasks))
    return console.export_text().splitlines()


def test_overall_bar_and_one_line_per_device(synthetic: tuple[Path, list[Any]]) -> None:
    run, plan = synthetic
    display = RunDisplay(plan, str(run), {}, label="4 devices", console=Console(file=io.StringIO()))
    write_progress(run, plan[1].name, device="cpu:1", rows_done=6, ok=5, failed=1, images_per_s=2.0, retries=1)
    write_progress(run, plan[3].name, device="cpu:3", state="failed", rows_done=2, ok=2, error="OSError: disk full")
    display.update()
    overall, *devices = render(display)
    assert overall.startswith("4 devices") and " 18/40 " in overall and "45%" in overall
    assert "2.0 img/s" in overall and "eta 0:00:11" in overall and "2 failed" in overall  # (40 - 18) / 2.0
    assert len(devices) == 4
    assert devices[0].startswith("cpu:0 shard-00000-of-00004") and "10/10" in devices[0] and "done" in devices[0]
    assert "1 failed" in devices[0] and devices[0].rstrip().endswith("complete")
    assert " 6/10 " in devices[1] and "2.0 img/s" in devices[1] and "eta 0:00:02" in devices[1]
    assert devices[1].rstrip().endswith("extracting · retry 1")
    assert " 0/10 " in devices[2] and devices[2].rstrip().endswith("starting a worker")
    assert devices[3].rstrip().endswith("failed · OSError: disk full")


def test_earlier_runs_file_is_waiting_and_a_restarted_shard_restarting(synthetic: tuple[Path, list[Any]]) -> None:
    run, plan = synthetic
    write_progress(run, plan[1].name, rows_done=7, started=time.time() - 60)  # left by an earlier run
    RunDir(run).parts(plan[2].name).mkdir()
    write_block(RunDir(run).chunk(plan[2].name, 20, 24), Block(np.arange(20, 24), list("abcd"),
                np.ones((4, 4), np.float32), np.zeros(0, np.int64), [], []), {}, 4, "float32")
    retries = {plan[2].name: [4]}
    display = RunDisplay(plan, str(run), retries, console=Console(file=io.StringIO()))
    write_progress(run, plan[2].name, rows_done=7, images_per_s=3.0)  # its worker died at 7 rows, 4 durable
    display.update()
    rows = {r["shard"]: r for r in display.last["rows"]}
    assert (rows[plan[1].name]["state"], rows[plan[1].name]["rows_done"]) == ("waiting", 0)
    restarted = rows[plan[2].name]
    assert (restarted["state"], restarted["rows_done"], restarted["images_per_s"]) == ("restarting", 4, 0.0)
    assert render(display)[3].rstrip().endswith("retry 1")


def test_plain_lines_every_interval(synthetic: tuple[Path, list[Any]], caplog: pytest.LogCaptureFixture) -> None:
    run, plan = synthetic
    caplog.set_level(logging.INFO, "featshard.progress")
    with RunDisplay(plan, str(run), {}, every=0.2, interval=0.05, console=Console(file=io.StringIO())) as display:
        write_progress(run, plan[1].name, device="cpu:1", rows_done=4, ok=4, images_per_s=2.0)
        time.sleep(0.8)
    assert display.mode == "plain"
    lines = [r.getMessage() for r in caplog.records if r.name == "featshard.progress"]
    assert len(lines) >= 2
    assert lines[-1].startswith("14/40 rows (35.0%), 13 ok, 1 failed, 2.0 images/s, eta 13s, ")
    assert "cpu:0 10/10 complete, cpu:1 4/10 extracting 2.0 img/s, cpu:2 0/10 starting a worker" in lines[-1]


def test_quiet_passes_warnings_and_the_final_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with quiet_logs(True):
            logging.getLogger("featshard.x").info("chatter")
            logging.getLogger("featshard.x").warning("a warning")
            logging.getLogger("featshard.x").info("the final line", extra=FINAL)
        logging.getLogger("featshard.x").info("after the run")
    finally:
        root.removeHandler(handler)
    assert stream.getvalue().splitlines() == ["a warning", "the final line", "after the run"]


def test_progress_every_is_checked() -> None:
    assert RunConfig(input="l", out="o", progress_every=0).progress_every == 0.0
    with pytest.raises(UsageError, match="--progress-every -1"):
        RunConfig(input="l", out="o", progress_every=-1)


# ---- end to end: the real CLI, two CPU workers ----------------------------------------------------------------------
SHARD_ROWS = 40


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A list of 2 x SHARD_ROWS rows over 8 tiny images, and next to it short.txt, 16 rows (made once)."""
    root = tmp_path_factory.mktemp("display")
    imgs = make_images(root / "imgs", 8)
    write_list(root / "short.txt", imgs * 2)
    return write_list(root / "list.txt", imgs * (2 * SHARD_ROWS // 8))


def run_args(lst: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--input", str(lst), "--out", str(out), "--gpus", "cpu:2", "--weights", "none", *FAST,
            "--batch-size", "2", "--chunk-size", "4", *extra]


class Terminal:
    """The real CLI on a pseudo-terminal of `cols` x `rows`; `screen()` is what a terminal shows (pyte)."""

    def __init__(self, args: list[str], cols: int = 160, rows: int = 200) -> None:
        import fcntl
        import pty
        import struct
        import subprocess
        import sys
        import termios
        import threading

        from helpers import REPO

        self.cols, self.rows, self.output = cols, rows, bytearray()
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TTY_COMPATIBLE",
                                                                 "TTY_INTERACTIVE", "FORCE_COLOR")}
        self.proc = subprocess.Popen([sys.executable, "-m", "featshard", *args], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=REPO, start_new_session=True,
                                     env=dict(env, PYTHONPATH=str(REPO), TERM="xterm-256color"))
        os.close(slave)
        self.master = master
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 1 << 16)
            except OSError:  # EIO: every writer closed the terminal
                return
            if not data:
                return
            self.output += data

    def wait(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(30)
        os.close(self.master)
        return code

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def screen(self) -> list[str]:
        import pyte

        screen = pyte.Screen(self.cols, self.rows)
        pyte.ByteStream(screen).feed(bytes(self.output))
        return [line.rstrip() for line in screen.display]


@pytest.mark.slow
def test_terminal_shows_one_display_and_whole_log_lines_even_when_a_worker_dies(images: Path, tmp_path: Path) -> None:
    """A loader of one worker is killed (its worker logs a warning and starts another), then that worker is
    SIGKILLed: its warning stays on the screen, whole, above the display; the coordinator retries the shard."""
    import psutil
    from test_resume import progress, wait_for

    out = tmp_path / "run"
    term = Terminal(run_args(images, out, "--max-retries", "1"))

    def victim() -> dict[str, Any] | None:
        return next((p for p in progress(out).values() if p.get("stage") == "extracting"
                     and 4 <= p.get("rows_done", 0) <= SHARD_ROWS - 16), None)

    worker = wait_for("a worker with a finished chunk and rows left", victim, term.proc)
    loaders = wait_for("its loaders", lambda: [c for c in psutil.Process(worker["pid"]).children()
                                               if "spawn_main" in " ".join(c.cmdline())], term.proc)
    loaders[0].kill()
    wait_for("the worker's warning", lambda: "starting a new loader" in term.text(), term.proc)
    os.kill(worker["pid"], signal.SIGKILL)
    assert term.wait() == 0, term.text()[-3000:]
    screen = [line for line in term.screen() if line]
    drawn = [i for i, line in enumerate(screen) if "━" in line]
    assert len(drawn) == 3, "\n".join(screen)  # the overall bar and one line per device, drawn once
    overall, *devices = (screen[i] for i in drawn)
    assert overall.startswith("2 devices") and f" {2 * SHARD_ROWS}/{2 * SHARD_ROWS} 100%" in overall
    assert [d.split()[0] for d in devices] == ["cpu:0", "cpu:1"]
    assert all(f" {SHARD_ROWS}/{SHARD_ROWS} " in d for d in devices), "\n".join(screen)
    assert sorted(d.rsplit(" • ", 1)[1] for d in devices) == ["complete", "complete · retry 1"], "\n".join(screen)
    logged = [line for line in screen if LOG_LINE.match(line)]
    warning = next(line for line in logged if "starting a new loader" in line)
    assert " WARNING worker-" in warning and "featshard.stream" in warning
    assert any(f"worker pid {worker['pid']}" in line and "retry 1/1" in line for line in logged)
    assert max(drawn) < next(i for i, line in enumerate(screen) if "run complete: 80 rows" in line)
    print("\n".join(screen))  # the screen, for -s


@pytest.mark.slow
def test_without_a_terminal_progress_lines_come_every_interval(images: Path, tmp_path: Path) -> None:
    proc = cli(*run_args(images.parent / "short.txt", tmp_path / "run", "--progress-every", "0.25"), check=True)
    lines = proc.stderr.splitlines()
    assert all(LOG_LINE.match(line) for line in lines), proc.stderr  # plain log lines only: no bar, no \r
    ticks = [line.split("featshard.progress: ", 1)[1] for line in lines if " featshard.progress: " in line]
    assert len(ticks) >= 3 and all(re.match(r"\d+/16 rows \(\d+\.\d%\), \d+ ok, \d+ failed, ", t) for t in ticks)
    assert all(re.search(r"; cpu:0 \d+/8 .*, cpu:1 \d+/8 ", t) for t in ticks)
    assert any(" INFO worker-" in line and "model mobilenet_v2" in line for line in lines)
    assert re.search(r"run complete: 16 rows, 16 ok, 0 failed in \d+s, \d+\.\d images/s -> ", lines[-1])


@pytest.mark.slow
def test_quiet_prints_only_warnings_and_the_final_line(images: Path, tmp_path: Path) -> None:
    proc = cli(*run_args(images.parent / "short.txt", tmp_path / "run", "--quiet"), check=True)
    lines = proc.stderr.splitlines()
    assert lines and "run complete: 16 rows, 16 ok, 0 failed" in lines[-1]
    assert all(" WARNING " in line or " ERROR " in line for line in lines[:-1]), proc.stderr

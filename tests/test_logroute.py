"""Log routing (featshard/runner/logroute.py): a worker's records, and its raw stdout/stderr, reach the coordinator
through its own socket connection, even when the worker is SIGKILLed right after logging; a record that cannot be
sent is printed to the process's own stderr."""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from pathlib import Path

import pytest

from featshard.runner.logroute import LogListener, RecordSender, route_to


def _log_then_die(address: str) -> None:
    """A worker: routes its logs, forks a 'loader' that logs, logs its last error and is SIGKILLed at once."""
    route_to(address, logging.INFO)
    pid = os.fork()
    if pid == 0:
        logging.getLogger("featshard.loader").warning("from the loader %d", os.getpid())
        os._exit(0)
    os.waitpid(pid, 0)
    print("printed", flush=True)
    os.write(2, b"written to fd 2 by a C library\nwithout a newline at the end")
    logging.getLogger("featshard.worker").error("last words of %d", os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


def test_records_of_a_killed_worker_and_its_forked_loader_arrive(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with LogListener() as listener:
        proc = multiprocessing.get_context("spawn").Process(target=_log_then_die, args=(listener.address,))
        proc.start()
        proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    got = {(r.name, r.levelname, r.processName): r.getMessage() for r in caplog.records}
    assert got[("featshard.worker", "ERROR", proc.name)] == f"last words of {proc.pid}"
    assert any(k[0] == "featshard.loader" and v.startswith("from the loader ") for k, v in got.items())
    output = [r.getMessage() for r in caplog.records if r.name == "featshard.worker.output"]
    assert output == ["printed", "written to fd 2 by a C library", "without a newline at the end"]
    assert {(r.levelname, r.processName) for r in caplog.records if r.name == "featshard.worker.output"} == {
        ("WARNING", proc.name)}
    assert not os.path.exists(listener.address)


def test_a_record_that_cannot_be_sent_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sender = RecordSender(str(tmp_path / "nobody-listens"))
    sender.handle(logging.makeLogRecord({"name": "featshard.w", "levelno": logging.ERROR, "levelname": "ERROR",
                                         "msg": "disk full"}))
    err = capsys.readouterr().err
    assert " ERROR " in err and "featshard.w: disk full" in err


def test_a_torn_record_or_a_stranger_does_not_stop_the_listener(caplog: pytest.LogCaptureFixture) -> None:
    """A process killed mid-send leaves half a record; a connection that is not ours sends garbage: both are dropped,
    and the records of everyone else still arrive."""
    import socket

    caplog.set_level(logging.INFO)
    with LogListener() as listener:
        for data in (b"LOG\n\x00\x00\x01\x00{\"msg\": ", b"GET / HTTP/1.1\r\n\r\n"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(listener.address)
                s.sendall(data)
        sender = RecordSender(listener.address)
        sender.handle(logging.makeLogRecord({"name": "featshard.w", "levelno": logging.WARNING,
                                             "levelname": "WARNING", "msg": "still here"}))
        sender.close()
    assert [r.getMessage() for r in caplog.records if r.name == "featshard.w"] == ["still here"]

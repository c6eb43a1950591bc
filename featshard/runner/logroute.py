"""Workers' log records reach the terminal through the coordinator, which prints them (above the live display).

The coordinator listens on a Unix socket in a private temporary folder (`LogListener`); every pool worker, and every
loader process forked from one, opens its own connection on its first record (`RecordSender`, set up by
`route_to` in the Pool's initializer) and sends each record as it is emitted: length-prefixed JSON, synchronously.
The listener's thread re-emits them through this process's loggers, so they go wherever this process's records go.
Whatever else a worker writes to its stdout or stderr (a C library's message, the interpreter's own "Exception
ignored ..."; its loader processes share these) goes through one more connection, set over its file descriptors 1
and 2, and comes out line by line as WARNING records of `featshard.worker.output`: nothing but the coordinator writes
to the terminal, so nothing cuts the display's lines.

Not a multiprocessing logging queue: a queue's writers share one lock, so a worker SIGKILLed while holding it blocks
every other writer forever, and a queue's records leave through a feeder thread after `log()` returned, so the last
error of a worker killed just then is lost. One connection per process shares nothing: the records a worker sent
before it died are in the kernel's socket buffer, which the listener reads to the end; a dead connection is closed.
A record that cannot be sent (the coordinator is gone) is printed to the process's own stderr instead.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import multiprocessing
import os
import selectors
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from typing import Any

from featshard.logs import stderr_handler, setup_logging

log = logging.getLogger("featshard.runner.logroute")
HEADER = struct.Struct(">L")
MAX_RECORD = 16 << 20  # a length beyond this is a broken stream, not a record
RECORDS, OUTPUT = b"LOG\n", b"OUT "  # what a connection carries, its first line: records, or a process's output
OUTPUT_LOGGER = "featshard.worker.output"


class RecordSender(logging.handlers.SocketHandler):
    """Sends records to a `LogListener`; each process (a forked loader too) uses its own connection."""

    def __init__(self, address: str) -> None:
        super().__init__(address, None)  # port None: a Unix socket
        self.fallback = stderr_handler()
        os.register_at_fork(after_in_child=self._forget_connection)

    def _forget_connection(self) -> None:
        """In a forked child: the parent's connection stays the parent's (two writers would interleave bytes)."""
        if self.sock is not None:
            self.sock.close()  # this process's copy of the descriptor only: the parent's connection stays open
            self.sock = None

    def makeSocket(self, timeout: float = 1) -> socket.socket:  # noqa: N802 - the base class's name
        sock = super().makeSocket(timeout)
        sock.sendall(RECORDS)
        return sock

    def makePickle(self, record: logging.LogRecord) -> bytes:  # noqa: N802 - the base class's name
        """JSON, not pickle: the listener never unpickles what a socket gives it."""
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        fields = dict(record.__dict__, msg=record.getMessage(), args=None, exc_info=None)
        fields.pop("message", None)
        data = json.dumps(fields, default=str).encode("utf-8")
        return HEADER.pack(len(data)) + data

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.send(self.makePickle(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.sock = None
        if self.sock is None:  # not connected, or the send failed: never lose a warning or an error
            self.fallback.handle(record)


def route_to(address: str, level: int) -> None:
    """In a worker process (the Pool's initializer): its records and warnings, its stdout and stderr, and those of the
    loader processes it forks, go to the coordinator's listener at `address`."""
    setup_logging(level, handler=RecordSender(address))
    logging.captureWarnings(True)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as out:
            out.connect(address)
            out.sendall(OUTPUT + multiprocessing.current_process().name.encode("utf-8", "replace") + b"\n")
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
    except OSError as exc:  # the records still go; this process's own output stays on its terminal
        log.debug("stdout and stderr not routed: %s", exc)


class LogListener:
    """The coordinator's end: a thread that accepts connections and re-emits every record received. `stop` (or
    leaving the `with` block) reads what the connections still hold, up to `drain` seconds, then closes them."""

    def __init__(self, drain: float = 2.0) -> None:
        self.drain = drain
        self._folder = tempfile.mkdtemp(prefix="featshard-log-")
        self.address = os.path.join(self._folder, "s")
        if len(self.address) > 100:  # the limit of a Unix socket path; $TMPDIR can be long
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = tempfile.mkdtemp(prefix="featshard-log-", dir="/tmp")
            self.address = os.path.join(self._folder, "s")
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.address)
        self._server.listen(64)
        self._server.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="featshard-logs", daemon=True)

    def __enter__(self) -> "LogListener":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._wake_w.send(b"x")
            self._thread.join(self.drain + 1.0)
        for sock in (self._server, self._wake_r, self._wake_w):
            sock.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._server, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        streams: dict[socket.socket, _Stream] = {}
        deadline = None
        while deadline is None or (streams and time.monotonic() < deadline):
            for key, _ in sel.select(0.2 if deadline is None else max(0.0, deadline - time.monotonic())):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if sock is self._wake_r:
                    deadline = time.monotonic() + self.drain
                    sel.unregister(sock)
                elif sock is self._server:
                    self._accept(sel, streams)
                elif not streams[sock].read(sock):
                    sel.unregister(sock)
                    sock.close()
                    streams.pop(sock).end()
        for sock, stream in streams.items():  # still open after the drain: a loader process left stuck in a read
            stream.end()
            sock.close()
        sel.close()

    def _accept(self, sel: selectors.BaseSelector, streams: dict[socket.socket, "_Stream"]) -> None:
        try:
            conn, _ = self._server.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ)
        streams[conn] = _Stream()


class _Stream:
    """One connection: its first line says what it carries (records, or the output of the process it names)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.output_of: str | None = None  # the process whose stdout/stderr this is; None: records
        self.started = False

    def read(self, sock: socket.socket) -> bool:
        """Read what is there and emit each whole record or line; False at the end of the stream."""
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        self.buf += data
        if not self.started:
            if b"\n" not in self.buf:
                return len(self.buf) < 4096
            tag, _, rest = bytes(self.buf).partition(b"\n")
            self.started, self.buf = True, bytearray(rest)
            if tag.startswith(OUTPUT):
                self.output_of = tag[len(OUTPUT):].decode("utf-8", "replace")
            elif tag + b"\n" != RECORDS:
                return False
        return self._lines() if self.output_of is not None else self._records()

    def _records(self) -> bool:
        while len(self.buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self.buf)
            if size > MAX_RECORD:
                return False
            if len(self.buf) < HEADER.size + size:
                break
            emit(bytes(self.buf[HEADER.size:HEADER.size + size]))
            del self.buf[:HEADER.size + size]
        return True

    def _lines(self) -> bool:
        *lines, rest = bytes(self.buf).split(b"\n")
        self.buf = bytearray(rest)
        for line in lines:
            emit_output(self.output_of or "?", line)
        return True

    def end(self) -> None:
        """The stream ended: a last line without its newline is still output; a torn last record (a process killed
        mid-send) is dropped."""
        if self.output_of is not None and self.buf:
            emit_output(self.output_of, bytes(self.buf))


def emit_output(process: str, line: bytes) -> None:
    text = line.decode("utf-8", "replace").rstrip()
    if text:
        logging.getLogger(OUTPUT_LOGGER).handle(logging.makeLogRecord({
            "name": OUTPUT_LOGGER, "levelno": logging.WARNING, "levelname": "WARNING", "msg": text,
            "processName": process}))


def emit(data: bytes) -> None:
    """Re-emit a received record through this process's logger of the same name."""
    try:
        fields: dict[str, Any] = json.loads(data)
        record = logging.makeLogRecord(fields)
    except (ValueError, TypeError) as exc:
        log.debug("dropped an unreadable log record: %s", exc)
        return
    logging.getLogger(record.name).handle(record)

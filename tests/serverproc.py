"""A real `featshard serve` process on 127.0.0.1 for tests, and a plain http.client to talk to it."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

from helpers import REPO


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:300]!r}>"


class Server:
    """`python -m featshard serve RUN ARGS` on a free loopback port; `start()` waits for /healthz 200."""

    def __init__(self, run_dir: Path, *args: str, log_path: Path) -> None:
        self.port = free_port()
        self.host = "127.0.0.1"
        self.url = f"http://{self.host}:{self.port}"
        self.log_path = log_path
        self.argv = [sys.executable, "-m", "featshard", "serve", str(run_dir), "--port", str(self.port), *args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.health_seen: list[int] = []  # /healthz statuses before the first 200

    def start(self, timeout: float = 120) -> "Server":
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.read_log()[-4000:]}")
            try:
                status = self.get("/healthz", timeout=5).status
            except OSError:
                time.sleep(0.1)
                continue
            self.health_seen.append(status)
            if status == 200:
                return self
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"server not healthy within {timeout} s:\n{self.read_log()[-4000:]}")

    def stop(self) -> int | None:
        """SIGTERM, as a service manager stops it: uvicorn shuts down gracefully, then re-raises the signal
        (return code -15); a return code of 0 or -15 with "Application shutdown complete" logged is a clean stop."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode

    def stopped_cleanly(self) -> bool:
        rc = self.stop()
        return rc in (0, -signal.SIGTERM) and "Application shutdown complete" in self.read_log()

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = 60, chunked: bool = False) -> Response:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def get(self, path: str, timeout: float = 60) -> Response:
        return self.request("GET", path, timeout=timeout)

    def upload(self, data: bytes, k: str | None = None, field: str = "image", filename: str = "q.jpg") -> Response:
        body, ctype = multipart({field: (filename, data)}, {"k": k} if k is not None else {})
        return self.request("POST", "/api/search", body, {"Content-Type": ctype})


def multipart(files: dict[str, tuple[str, bytes]], fields: dict[str, str]) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A valid-looking PNG of a few hundred bytes whose header declares width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + \
        chunk(b"IEND", b"")

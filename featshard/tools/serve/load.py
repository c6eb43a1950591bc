"""A bounded load test of a local `featshard serve`: N image searches, C at a time, then req/s and latencies.

    python -m featshard.tools.serve.load http://127.0.0.1:8000 IMAGES_DIR_OR_FILES... -n 500 -c 1 -c 8

Each client thread keeps one HTTP/1.1 connection and uploads the given images in turn (POST /api/search); the run
stops after N requests per concurrency level. Only loopback servers are accepted (it is a benchmark of this
machine's server, not a tool to load someone else's). Prints one Markdown table row per level, with the mean batch
size the server formed (forward passes from /api/info before and after).
"""
from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import socket
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from featshard.errors import UsageError
from featshard.store.inputs import IMAGE_EXTENSIONS


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    wall_s: float
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    first_ids: list[int] = field(default_factory=list)  # per request (in order): the first result's id, -1 if none
    forward_passes: int = 0

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 200)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    def row(self) -> str:
        batch = self.requests / self.forward_passes if self.forward_passes else float("nan")
        return (f"| {self.concurrency} | {self.requests} | {self.requests / self.wall_s:.1f} | "
                f"{statistics.median(self.latencies_s) * 1000:.0f} | {self.quantile(0.95) * 1000:.0f} | "
                f"{batch:.1f} | {self.errors} |")


HEADER = "| clients | requests | req/s | p50 ms | p95 ms | mean batch | errors |\n|---|---|---|---|---|---|---|"


def loopback_target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve {host!r}: {exc}") from None
    if parts.scheme != "http" or not addrs or not all(ipaddress.ip_address(a).is_loopback for a in addrs):
        raise UsageError(f"{url}: only http:// servers on this machine (127.0.0.1, localhost, ::1) are load-tested")
    return host, port


def multipart_body(data: bytes, k: int) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def get_json(host: str, port: int, path: str) -> Any:
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def run_load(url: str, payloads: Sequence[bytes], requests: int, concurrency: int, k: int = 10,
             timeout: float = 60) -> LoadResult:
    """`requests` searches (payloads in turn), `concurrency` in flight, each client on one kept-alive connection."""
    host, port = loopback_target(url)
    bodies = [multipart_body(p, k) for p in payloads]
    local = threading.local()
    result = LoadResult(requests, concurrency, 0.0, first_ids=[-1] * requests)
    lock = threading.Lock()

    def one(i: int) -> None:
        if getattr(local, "conn", None) is None:
            local.conn = http.client.HTTPConnection(host, port, timeout=timeout)
        body, ctype = bodies[i % len(bodies)]
        started = time.perf_counter()
        try:
            local.conn.request("POST", "/api/search", body=body, headers={"Content-Type": ctype})
            resp = local.conn.getresponse()
            raw, status = resp.read(), resp.status
            if resp.will_close:
                local.conn.close()
                local.conn = None
        except (OSError, http.client.HTTPException):
            local.conn.close()
            local.conn, raw, status = None, b"", 0
        elapsed = time.perf_counter() - started
        first = json.loads(raw)["results"][0]["id"] if status == 200 and raw else -1
        with lock:
            result.latencies_s.append(elapsed)
            result.statuses[status] = result.statuses.get(status, 0) + 1
            result.first_ids[i] = first

    before = get_json(host, port, "/api/info").get("forward_passes", 0)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    result.wall_s = time.perf_counter() - started
    result.forward_passes = get_json(host, port, "/api/info").get("forward_passes", 0) - before
    return result


def image_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS) if p.is_dir() else [p]
    if not files:
        raise UsageError("no image files given")
    return files


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m featshard.tools.serve.load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("images", nargs="+", help="image files or folders to upload in turn")
    p.add_argument("-n", "--requests", type=int, default=500, help="requests per concurrency level (default 500)")
    p.add_argument("-c", "--concurrency", type=int, action="append", help="clients at once (repeatable; default 8)")
    p.add_argument("-k", type=int, default=10, help="results per search (default 10)")
    p.add_argument("--warmup", type=int, default=16, help="requests sent first and not counted (default 16)")
    args = p.parse_args(argv)
    try:
        payloads = [f.read_bytes() for f in image_files(args.images)]
        if args.warmup:
            run_load(args.url, payloads, args.warmup, 2, args.k)
        print(HEADER)
        for c in args.concurrency or [8]:
            print(run_load(args.url, payloads, max(1, args.requests), max(1, c), args.k).row(), flush=True)
    except UsageError as exc:
        print(f"serveload: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

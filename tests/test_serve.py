"""`featshard serve` end to end: a real server process on 127.0.0.1 over a real (float16) run plus an added run,
in an on-disk IVF index.

Every endpoint, every hostile input of issue 11 (each a 4xx JSON answer, /healthz still 200 afterwards), answers
equal to `featshard search --json`, batching of concurrent requests, overload (503), the per-request timeout (504),
and a bounded load test (500 requests, 8 at a time, loopback only) that prints p50/p95.
"""
from __future__ import annotations

import io
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from helpers import FAST, cli, make_images, mobilenet_weights, write_list
from PIL import Image
from serverproc import Server, bomb_png, free_port, multipart

from featshard.errors import UsageError
from featshard.tools.serve.load import HEADER, loopback_target, run_load

pytestmark = pytest.mark.slow
N_A, N_B = 8, 3  # stored images of the served run and of the run added to its index
BROKEN_ROW = N_A  # the served run's last row is not an image: a failed row, never served
OFFSET = N_A + 1  # ids of the added run start after the served run's rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("serve")
    images = make_images(base / "imgs", N_A)
    (base / "imgs" / "broken.jpg").write_text("not an image")
    write_list(base / "a.txt", [p.relative_to(base) for p in images] + ["imgs/broken.jpg"])
    write_list(base / "b.txt", make_images(base / "more", N_B, seed=5))
    args = [*FAST, "--gpus", "cpu", "--weights", mobilenet_weights(), "--dtype", "float16"]
    with ThreadPoolExecutor(2) as pool:  # the two runs side by side: half the fixture's time on 2 cores
        list(pool.map(lambda io: cli("run", "--input", str(base / io[0]), "--out", str(base / io[1]), *args,
                                     check=True), [("a.txt", "run"), ("b.txt", "more-run")]))
    # an on-disk IVF (memory-mapped lists) with nprobe = nlist: exact answers, comparable one to one
    cli("merge", str(base / "run"), "--index-spec", "IVF2,Flat", "--on-disk", check=True)
    cli("add", str(base / "run"), "--from", str(base / "more-run"), check=True)
    return base


@pytest.fixture(scope="module")
def server(runs: Path):
    srv = Server(runs / "run", "-k", "5", "--max-upload-mb", "1", log_path=runs / "serve.log").start()
    yield srv
    assert srv.stopped_cleanly(), srv.read_log()[-3000:]


def image_bytes(runs: Path, ident: int) -> bytes:
    if ident < N_A:
        return sorted((runs / "imgs").glob("img*"))[ident].read_bytes()
    return sorted((runs / "more").glob("img*"))[ident - OFFSET].read_bytes()


def image_path(runs: Path, ident: int) -> Path:
    return sorted((runs / "imgs").glob("img*"))[ident] if ident < N_A else \
        sorted((runs / "more").glob("img*"))[ident - OFFSET]


def test_health_is_503_while_loading_then_200_and_binds_loopback(server):
    assert 503 in server.health_seen and server.health_seen[-1] == 200
    assert server.get("/healthz").json() == {"status": "ok"}
    listening = [c.laddr for c in psutil.Process(server.proc.pid).net_connections("tcp") if c.status == "LISTEN"]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening)


def test_info_describes_model_index_and_runs(server):
    info = server.get("/api/info").json()
    assert (info["model"], info["layer"], info["dim"], info["dtype"]) == ("mobilenet_v2", "classifier.0", 1280,
                                                                          "float16")
    assert info["ntotal"] == N_A + N_B and info["spec"] == "IVF2,Flat" and info["metric"] == "ip"
    assert info["on_disk"] and info["search_params"] == {"nprobe": 2}
    assert info["recall_at_10"] == pytest.approx(1.0) and info["k"] == 5 and info["max_upload_mb"] == 1
    assert [(r["name"], r["id_offset"], r["rows"], r["stored"], r["images"]) for r in info["runs"]] == [
        ("run", 0, N_A + 1, N_A, True), ("more-run", OFFSET, N_B, N_B, True)]


def test_upload_equals_cli_search_json(server, runs):
    import json

    idents = [3, OFFSET + 1]  # one image of the served run, one of the added run
    proc = cli("search", str(runs / "run"), *[a for i in idents for a in ("--image", str(image_path(runs, i)))],
               "-k", "50", "--json", check=True)
    for ident, expected in zip(idents, json.loads(proc.stdout)):
        got = server.upload(image_bytes(runs, ident), k="50")
        assert got.status == 200, got
        results = got.json()["results"]
        assert [r["id"] for r in results] == [r["id"] for r in expected["results"]]
        for mine, theirs in zip(results, expected["results"]):
            assert mine["score"] == pytest.approx(theirs["score"], abs=1e-4)
            assert (mine["name"], mine["row"]) == (theirs["name"], theirs["row"])
        assert len(results) == N_A + N_B  # k above ntotal is clamped
        assert results[0]["id"] == ident and results[0]["score"] >= 0.9999  # a stored image finds itself first
        assert results[0]["run"] == ("run" if ident < N_A else "more-run")


def test_neighbors_come_from_the_stored_vector(server, runs):
    passes = server.get("/api/info").json()["forward_passes"]
    got = server.get(f"/api/neighbors/{OFFSET}?k=4")
    assert got.status == 200, got
    body = got.json()
    assert server.get("/api/info").json()["forward_passes"] == passes  # no re-extraction
    assert body["query"] == {"id": OFFSET, "name": str(image_path(runs, OFFSET)), "row": 0, "run": "more-run"}
    uploaded = server.upload(image_bytes(runs, OFFSET), k="4").json()["results"]
    assert [r["id"] for r in body["results"]] == [r["id"] for r in uploaded]
    # the upload's vector is cast to the run's float16 like the stored one: its self-score is the stored one's
    assert body["results"][0]["score"] == pytest.approx(uploaded[0]["score"], abs=3e-6)
    assert server.get("/api/neighbors/2").json()["results"].__len__() == 5  # the server's -k


def test_stored_images_and_cached_thumbnails(server, runs):
    for ident, ctype in [(3, "image/png"), (0, "image/jpeg"), (OFFSET + 2, "image/jpeg")]:
        got = server.get(f"/image/{ident}")
        assert got.status == 200 and got.body == image_bytes(runs, ident) and got.headers["content-type"] == ctype
    before = server.get("/api/info").json()["thumbs"]
    thumb = server.get("/thumb/4")
    assert thumb.status == 200 and thumb.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(thumb.body))
    assert im.format == "JPEG" and max(im.size) == 256
    assert server.get("/thumb/4").body == thumb.body
    after = server.get("/api/info").json()["thumbs"]
    assert after["hits"] == before["hits"] + 1 and after["items"] >= 1


def jpeg_bytes(runs: Path) -> bytes:
    return image_bytes(runs, 0)


HOSTILE_UPLOADS = {
    "not an image": (lambda r: b"hello, this is text" * 10, None, "image", 400, "not_image"),
    "empty file": (lambda r: b"", None, "image", 400, "empty"),
    "truncated jpeg": (lambda r: jpeg_bytes(r)[: len(jpeg_bytes(r)) // 2], None, "image", 400, "truncated"),
    "40000x40000 png bomb": (lambda r: bomb_png(), None, "image", 400, "too_large"),
    "missing field": (jpeg_bytes, None, "picture", 400, "missing_field"),
    "k zero": (jpeg_bytes, "0", "image", 400, "bad_k"),
    "k negative": (jpeg_bytes, "-3", "image", 400, "bad_k"),
    "k text": (jpeg_bytes, "ten", "image", 400, "bad_k"),
    "k fraction": (jpeg_bytes, "1.5", "image", 400, "bad_k"),
    "k huge digits": (jpeg_bytes, "9" * 40, "image", 400, "bad_k"),
}


@pytest.mark.parametrize("case", HOSTILE_UPLOADS, ids=list(HOSTILE_UPLOADS))
def test_hostile_uploads_get_a_json_4xx_and_the_server_lives(server, runs, case):
    make, k, field, status, reason = HOSTILE_UPLOADS[case]
    started = time.monotonic()
    got = server.upload(make(runs), k=k, field=field)
    assert got.status == status and got.headers["content-type"] == "application/json", got
    assert got.json()["reason"] == reason and got.json()["error"]
    assert time.monotonic() - started < 10
    assert server.get("/healthz").status == 200


def test_other_bad_requests(server, runs):
    assert server.request("POST", "/api/search", b"{}", {"Content-Type": "application/json"}).status == 415
    assert server.request("POST", "/api/search", b"garbage", {"Content-Type": "multipart/form-data"}).status == 400
    assert server.request("POST", "/api/search", b"x", {"Content-Type": "multipart/form-data; boundary=b"}
                          ).status == 400
    assert server.get("/api/search").status == 405 and server.request("POST", "/image/1").status == 405
    big = server.upload(jpeg_bytes(runs), k="1000000000000")  # a positive k above ntotal is clamped
    assert big.status == 200 and len(big.json()["results"]) == N_A + N_B
    assert len(server.upload(jpeg_bytes(runs)).json()["results"]) == 5  # the server's -k
    assert server.get("/healthz").status == 200


BAD_PATHS = ["/image/..%2F..%2Fetc%2Fpasswd", "/image/../../etc/passwd", "/thumb/..%2fmanifest.json", "/image/-1",
             "/image/abc", "/image/999999", f"/image/{BROKEN_ROW}", f"/thumb/{BROKEN_ROW}", f"/image/{OFFSET + N_B}",
             "/image/1e3", "/image/0x1", "/image/%201", "/image/1%00", "/image/3%2F..%2F..%2Fmanifest.json",
             "/image/" + "9" * 30, "/api/neighbors/-1", "/api/neighbors/abc", f"/api/neighbors/{BROKEN_ROW}",
             "/api/neighbors/999999", "/etc/passwd", "/static/../manifest.json", "/index.html"]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_paths_that_are_not_stored_images_are_json_404(server, path):
    got = server.get(path)
    assert got.status == 404 and got.headers["content-type"] == "application/json", got
    assert "error" in got.json() and b"root:" not in got.body
    assert server.get("/healthz").status == 200


def test_bodies_over_max_upload_mb_are_413(server, runs):
    big = jpeg_bytes(runs) + bytes(1_200_000)  # --max-upload-mb 1
    assert server.upload(big).status == 413  # Content-Length says so
    data, ctype = multipart({"image": ("big.jpg", big)}, {})
    body = io.BytesIO(data)
    chunked = iter(lambda: body.read(65536), b"")
    got = server.request("POST", "/api/search", chunked, {"Content-Type": ctype}, chunked=True)
    assert got.status == 413 and got.json()["reason"] == "too_large_upload"  # found while streaming
    with socket.create_connection((server.host, server.port), timeout=10) as s:  # Expect: 100-continue: no body sent
        s.sendall(b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                  b"Content-Length: 5000000\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    assert server.get("/healthz").status == 200


def test_dedup_groups_are_paged(server):
    everything = server.get("/api/dedup?threshold=-1").json()
    assert everything["total"] == 1 and everything["pages"] == 1 and everything["metric"] == "ip"
    assert sorted(m["id"] for m in everything["groups"][0]["members"]) == \
        list(range(N_A)) + list(range(OFFSET, OFFSET + N_B))
    assert server.get("/api/dedup?threshold=-1&page=1").json()["groups"] == []
    assert server.get("/api/dedup?threshold=1.5").json()["total"] == 0
    assert server.get("/api/dedup").json()["threshold"] == 0.9
    for bad in ("threshold=abc", "threshold=nan", "page=-1", "page=x"):
        got = server.get(f"/api/dedup?{bad}")
        assert got.status == 400 and got.json()["error"], (bad, got)


def test_the_page_and_its_files_are_served(server):
    page = server.get("/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert b'src="/app.js"' in page.body and b"http" not in page.body  # nothing from elsewhere
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for path, ctype in [("/app.js", "text/javascript"), ("/style.css", "text/css")]:
        got = server.get(path)
        assert got.status == 200 and got.headers["content-type"].startswith(ctype) and len(got.body) > 500


def test_one_log_line_per_request(server):
    tag = uuid.uuid4().hex
    server.get(f"/healthz?probe={tag}")
    server.get(f"/image/abc?probe={tag}")
    time.sleep(0.2)
    lines = [line for line in server.read_log().splitlines() if tag in line]
    assert len(lines) == 2, lines
    assert "GET /healthz?probe=" in lines[0] and " 200 " in lines[0] and " 404 " in lines[1]


def test_concurrent_searches_share_forward_passes(server, runs):
    before = server.get("/api/info").json()
    idents = list(range(N_A))
    barrier = threading.Barrier(len(idents))

    def one(ident: int) -> tuple[int, int]:
        data = image_bytes(runs, ident)
        barrier.wait()
        got = server.upload(data, k="1")
        return got.status, got.json()["results"][0]["id"]

    with ThreadPoolExecutor(len(idents)) as pool:
        answers = list(pool.map(one, idents))
    assert answers == [(200, i) for i in idents]  # each caller got its own answer
    after = server.get("/api/info").json()
    batches = after["batching"]["batches"] - before["batching"]["batches"]
    passes = after["forward_passes"] - before["forward_passes"]
    assert passes == batches and 1 <= batches < len(idents), (before, after)
    assert after["batching"]["max_batch_seen"] >= 2


def test_load_500_requests_8_at_a_time(server, runs):
    """Bounded: 500 uploads of stored images, 8 in flight, to 127.0.0.1 only; zero errors; prints p50/p95."""
    payloads = [image_bytes(runs, i) for i in range(N_A)]
    result = run_load(server.url, payloads, requests=500, concurrency=8, k=3)
    print(f"\nload, 500 requests, 8 at a time:\n{HEADER}\n{result.row()}")
    assert result.statuses == {200: 500} and len(result.latencies_s) == 500
    assert result.first_ids == [i % N_A for i in range(500)]  # every answer is its own query's
    assert result.forward_passes < 500  # batched
    assert server.get("/healthz").status == 200


def test_load_tester_only_targets_loopback():
    for url in ("http://10.1.2.3:8000", "http://192.168.0.1", "https://127.0.0.1:8000", "ftp://localhost"):
        with pytest.raises(UsageError):
            loopback_target(url)
    assert loopback_target("http://127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert loopback_target("http://localhost:9") == ("localhost", 9)


@pytest.fixture()
def small_server(runs: Path):
    srv = Server(runs / "run", "--max-queue", "1", "--timeout", "1.5", log_path=runs / "serve-small.log").start()
    yield srv
    assert srv.stopped_cleanly(), srv.read_log()[-3000:]


def test_overload_is_503_and_slow_requests_time_out(small_server, runs):
    payloads = [image_bytes(runs, i) for i in range(N_A)]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda d: small_server.upload(d).status, payloads * 2))
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    with socket.create_connection((small_server.host, small_server.port), timeout=20) as s:
        started = time.monotonic()
        s.sendall(b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                  b"Content-Length: 1000\r\n\r\n--x\r\n")  # ... and then nothing: a stalled client
        reply = b"".join(iter(lambda: s.recv(4096), b""))  # the server closes: the body never came
    assert reply.startswith(b"HTTP/1.1 504") and b'"reason":"timeout"' in reply
    assert 1.0 < time.monotonic() - started < 15
    assert small_server.get("/healthz").status == 200 and small_server.upload(payloads[0]).status == 200


def test_serve_refuses_what_it_cannot_serve(tmp_path, runs):
    proc = cli("serve", str(tmp_path))
    assert proc.returncode == 1 and "not a featshard run" in proc.stderr
    proc = cli("serve", str(runs / "more-run"))
    assert proc.returncode == 1 and "has no index" in proc.stderr
    proc = cli("serve", str(runs / "run"), "--gpus", "cpu:2")
    assert proc.returncode == 2 and "one model per process" in proc.stderr
    proc = cli("serve", str(runs / "run"), "--max-batch", "0")
    assert proc.returncode == 2 and "--max-batch" in proc.stderr


def test_a_run_that_cannot_load_stops_the_server_with_the_reason(tmp_path, runs):
    import json
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(runs / "run", copy, ignore=shutil.ignore_patterns("serve-cache"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model"]["weights"] = str(tmp_path / "gone.pth")  # the fine-tuned weights file was deleted
    (copy / "manifest.json").write_text(json.dumps(manifest))
    proc = cli("serve", str(copy), "--port", str(free_port()), timeout=120)
    assert proc.returncode == 1 and "queries need the same weights" in proc.stderr, proc.stderr[-2000:]

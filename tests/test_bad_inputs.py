"""The bad-input corpus (tests/helpers/corpus.py) end to end through the real CLI: CSV input (for the name with a
newline), `--gpus cpu:2`, a short per-image deadline. The run completes, `verify` passes, every bad file is a failure
row with its expected reason class, every good one (the huge 6000x4000 JPEG included) a feature row, and the same path
listed twice gives two rows with the same features.

One more row is a file whose reads never complete, as on a stalled network mount: a one-file FUSE file system served
by this test (raw /dev/fuse protocol, no libfuse; needs root, else that row is left out and its test skipped). It
answers the kernel's interrupt with EINTR, as an interruptible network file system does, so the per-image deadline
(SIGALRM) ends the read and the row is recorded as `timeout`. (A hard mount that ignores interrupts keeps the reader
in uninterruptible sleep: only the loader's own timeout helps there; the worker then records that batch as
`timeout` and goes on with a new loader, see featshard.extract.stream.BatchStream.)"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import json
import os
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import pytest
from helpers import make_corpus
from helpers import FAST, cli

pytestmark = pytest.mark.slow  # runs the real pipeline: `make test-fast` leaves it out


# ---- a file whose reads never complete ---------------------------------------------------------------------------
IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
ATTR = struct.Struct("<6Q10I")
LOOKUP, FORGET, GETATTR, OPEN, READ, RELEASE, FLUSH, INIT, INTERRUPT, BATCH_FORGET = 1, 2, 3, 14, 15, 18, 25, 26, 36, 42


class StalledFile:
    """A one-file FUSE mount (raw /dev/fuse protocol, no libfuse) whose reads never complete, like a file on a
    stalled network mount. With honour_interrupts a signal ends the read with EINTR (as an interruptible network
    file system does); without, only a fatal signal ends it (a hard NFS mount)."""

    def __init__(self, mountpoint: Path, name: str = "stalled.jpg", size: int = 100_000,
                 honour_interrupts: bool = True) -> None:
        self.mountpoint, self.name, self.size = mountpoint, name.encode(), size
        self.honour = honour_interrupts
        self.reads: list[int] = []
        self.fd = -1

    @property
    def path(self) -> Path:
        return self.mountpoint / self.name.decode()

    def __enter__(self) -> "StalledFile":
        self.fd = os.open("/dev/fuse", os.O_RDWR)
        libc = ctypes.CDLL(None, use_errno=True)
        opts = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0".encode()
        if libc.mount(b"featshard-stalled", str(self.mountpoint).encode(), b"fuse", 6, opts) != 0:  # NOSUID|NODEV
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"mount fuse: {os.strerror(err)}")
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # aborts the connection: a read still waiting fails with ECONNABORTED
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(str(self.mountpoint).encode(), 2)  # MNT_DETACH

    def _reply(self, unique: int, error: int = 0, body: bytes = b"") -> None:
        try:
            os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), -error, unique) + body)
        except OSError:
            pass

    def _attr(self, nodeid: int) -> bytes:
        now = int(time.time())
        if nodeid == 1:
            return ATTR.pack(1, 0, 0, now, now, now, 0, 0, 0, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 4096, 0)
        return ATTR.pack(2, self.size, (self.size + 511) // 512, now, now, now, 0, 0, 0, stat.S_IFREG | 0o644, 1,
                         0, 0, 0, 4096, 0)

    def _serve(self) -> None:
        while True:
            try:
                msg = os.read(self.fd, 1 << 20)
            except OSError:
                return
            size, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(msg)
            body = msg[IN_HEADER.size: size]
            self._handle(opcode, unique, nodeid, body)

    def _handle(self, opcode: int, unique: int, nodeid: int, body: bytes) -> None:
        if opcode == INIT:
            major, minor = struct.unpack_from("<II", body)
            self._reply(unique, body=struct.pack("<IIIIHHIIHHII6I", 7, min(minor, 31), 0, 0, 16, 12, 131072, 1,
                                                  0, 0, 0, 0, *([0] * 6)))
        elif opcode == LOOKUP:
            if nodeid == 1 and body.rstrip(b"\0") == self.name:
                self._reply(unique, body=struct.pack("<QQQQII", 2, 0, 60, 60, 0, 0) + self._attr(2))
            else:
                self._reply(unique, errno.ENOENT)
        elif opcode == GETATTR:
            self._reply(unique, body=struct.pack("<QII", 60, 0, 0) + self._attr(nodeid))
        elif opcode == OPEN:
            self._reply(unique, body=struct.pack("<QIi", 1, 1, 0))  # FOPEN_DIRECT_IO: every read asks us
        elif opcode == READ:
            self.reads.append(unique)  # never answered: the reader waits
        elif opcode == INTERRUPT:
            if self.honour:
                (target,) = struct.unpack_from("<Q", body)
                self._reply(target, errno.EINTR)
        elif opcode in (FORGET, BATCH_FORGET):
            pass
        elif opcode in (RELEASE, FLUSH):
            self._reply(unique)
        else:
            self._reply(unique, errno.ENOSYS)



@contextlib.contextmanager
def stalled_file(folder: Path) -> Iterator[Path | None]:
    folder.mkdir()
    try:
        fs = StalledFile(folder)
        fs.__enter__()
    except OSError:
        yield None  # no /dev/fuse, or not allowed to mount
        return
    try:
        yield fs.path
    finally:
        fs.__exit__()


# ---- the corpus run -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[tuple[str, str | None]]]]:
    root = tmp_path_factory.mktemp("bad")
    entries = make_corpus(root / "corpus")
    entries = [(f"corpus/{name}", reason) for name, reason in [*entries, entries[0]]]  # a path listed twice
    with stalled_file(root / "stalled") as stalled:
        if stalled is not None:
            entries.append((str(stalled), "timeout"))
        with open(root / "list.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path"])
            writer.writerows([name] for name, _ in entries)
        out = root / "run"
        cli("run", "--input", str(root / "list.csv"), "--out", str(out), "--gpus", "cpu:2", "--weights", "none",
            "--image-timeout", "3", "--chunk-size", "8", *FAST, check=True, timeout=600)
    yield out, entries


def stored(run: Path) -> tuple[dict[int, tuple[str, np.ndarray]], dict[int, tuple[str, str]]]:
    feats, failed = {}, {}
    for path in sorted((run / "shards").glob("shard-*.h5")):
        with h5py.File(path, "r") as h5:
            feats.update({int(r): (n, f) for r, n, f in zip(h5["rows"][...], h5["names"].asstr()[...],
                                                            h5["features"][...])})
            failed.update({int(r): (n, m) for r, n, m in zip(h5["failed_rows"][...], h5["failed_names"].asstr()[...],
                                                             h5["failed_reasons"].asstr()[...])})
    return feats, failed


def test_run_completes_and_verify_passes(corpus_run: tuple[Path, list[tuple[str, str | None]]]) -> None:
    run, entries = corpus_run
    summary = json.loads((run / "summary.json").read_text())
    expected_failures = sum(1 for _, reason in entries if reason)
    assert (summary["complete"], summary["rows"], summary["failed"]) == (True, len(entries), expected_failures)
    proc = cli("verify", str(run), "--json")
    assert proc.returncode == 0, proc.stdout
    assert json.loads(proc.stdout)["counts"]["failed_rows"] == expected_failures


def test_every_row_has_its_expected_outcome(corpus_run: tuple[Path, list[tuple[str, str | None]]]) -> None:
    run, entries = corpus_run
    feats, failed = stored(run)
    assert sorted([*feats, *failed]) == list(range(len(entries)))
    wrong = []
    for row, (name, reason) in enumerate(entries):
        got = failed[row][1].split(":", 1)[0] if row in failed else None
        if got != reason:
            wrong.append((name, reason, failed.get(row, ("", "feature"))[1]))
        stored_name = (feats.get(row) or failed.get(row))[0]
        assert stored_name == name  # names with spaces, commas, quotes, non-ASCII and a newline
    assert not wrong, wrong
    for row, (_, vec) in feats.items():
        assert np.isfinite(vec).all() and abs(np.linalg.norm(vec) - 1) < 1e-3


def test_huge_image_and_repeated_path(corpus_run: tuple[Path, list[tuple[str, str | None]]]) -> None:
    run, entries = corpus_run
    feats, _ = stored(run)
    names = [name for name, _ in entries]
    assert names.index("corpus/huge_6000x4000.jpg") in feats
    again = names.index(names[0], 1)
    np.testing.assert_allclose(feats[0][1], feats[again][1], atol=1e-5)


def test_a_read_that_never_returns_is_a_timeout(corpus_run: tuple[Path, list[tuple[str, str | None]]]) -> None:
    run, entries = corpus_run
    if entries[-1][1] != "timeout":
        pytest.skip("cannot mount a FUSE file system here (needs /dev/fuse and root)")
    _, failed = stored(run)
    assert failed[len(entries) - 1][1] == "timeout: no result within 3 s (open + decode)"

"""The member table of a WebDataset tar, scanned once and cached: what `featshard.store.webdataset` streams rows from.

`tarfile` in "r:" mode seeks over member data, so a scan reads only the 512-byte headers. The table of a tar goes
into an index file, `<cache>/tar-index/<hash>.jsonl`, keyed by the tar's path, size, mtime and inode: a JSON header
line (sample count, truncation) then one `[member, offset, size]` line per sample. The cache is
`$FEATSHARD_CACHE_DIR`, else `$XDG_CACHE_HOME/featshard`, else `~/.cache/featshard`; where it cannot be written,
every pass rescans the headers. Memory stays flat whatever the number of samples.

A tar that ends early (or whose headers stop parsing) keeps the samples before that point: the cut member fails as
`truncated` when read, and a warning names the tar.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, TextIO

from featshard.errors import FeatshardError
from featshard.store.atomic import write_atomic

log = logging.getLogger("featshard.store.tarindex")

INDEX_FORMAT = "featshard-tar-index/1"
HEADER_WIDTH = 1024  # the index's first line is rewritten in place once the count is known
IMAGE_EXTS = frozenset("jpg jpeg jpe jfif png webp bmp tif tiff gif ppm pgm pbm".split())


@dataclass(frozen=True)
class TarRef:
    """A tar as it was when the input was opened: its index is found by this identity."""

    path: str
    size: int
    mtime_ns: int
    inode: int


def cache_dir() -> Path:
    root = os.environ.get("FEATSHARD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "featshard")
    return Path(root) / "tar-index"


def index_path(ref: TarRef) -> Path:
    key = f"{ref.path}\0{ref.size}\0{ref.mtime_ns}\0{ref.inode}".encode("utf-8", "surrogateescape")
    return cache_dir() / f"{hashlib.sha256(key).hexdigest()[:32]}.jsonl"


class TarEntries:
    """Context manager: (sample count, iterator of (member, offset, size)) of one tar, from its index file (built
    first when missing), or from a fresh header scan where the cache cannot be written."""

    def __init__(self, ref: TarRef) -> None:
        self.ref = ref
        self.fh: TextIO | None = None

    def __enter__(self) -> tuple[int, Iterator[tuple[str, int, int]]]:
        path = ensure_index(self.ref)
        if path is None:
            count = sum(1 for _ in TarScan(self.ref.path))
            return count, TarScan(self.ref.path)
        self.fh = fh = open(path, encoding="utf-8")
        header = json.loads(fh.readline())
        entries = ((str(m), int(o), int(s)) for m, o, s in map(json.loads, fh))
        return int(header["samples"]), entries

    def __exit__(self, *exc: object) -> None:
        if self.fh is not None:
            self.fh.close()


_unwritable_warned = False


def ensure_index(ref: TarRef) -> Path | None:
    """The tar's index file, built now if missing; None where the cache folder cannot be written."""
    global _unwritable_warned
    path = index_path(ref)
    if path.is_file():
        return path
    _check_unchanged(ref)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_index(ref, path)
    except OSError as exc:
        if not _unwritable_warned:
            log.warning("cannot write tar indexes under %s (%s): every pass rescans the tar headers "
                        "(set FEATSHARD_CACHE_DIR to a writable folder)", path.parent, exc)
            _unwritable_warned = True
        return None
    return path


def _check_unchanged(ref: TarRef) -> None:
    try:
        st = os.stat(ref.path)
    except OSError as exc:
        raise FeatshardError(f"{ref.path}: cannot read the tar: {exc}") from exc
    if (st.st_size, st.st_mtime_ns, st.st_ino) != (ref.size, ref.mtime_ns, ref.inode):
        raise FeatshardError(f"{ref.path} changed since the input was opened (size {ref.size} -> {st.st_size}) "
                             "and its member table is not cached: restart the command")


def _write_index(ref: TarRef, path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(" " * (HEADER_WIDTH - 1) + "\n")
            scan = TarScan(ref.path)
            count = 0
            for entry in scan:
                fh.write(json.dumps(list(entry)) + "\n")
                count += 1
            header = json.dumps({"format": INDEX_FORMAT, "size": ref.size, "mtime_ns": ref.mtime_ns,
                                 "samples": count, "problem": scan.problem[:500]})
            fh.seek(0)
            fh.write(header.ljust(HEADER_WIDTH - 1))

    write_atomic(path, write)


class TarScan:
    """Iterator of (member name, data offset, size) of each sample's image, in tar order, reading headers only.
    After iteration, `problem` says why the tar ended early ("" when it ended properly)."""

    def __init__(self, path: str) -> None:
        self.path, self.problem = path, ""
        self._it = self._samples()

    def __iter__(self) -> "TarScan":
        return self

    def __next__(self) -> tuple[str, int, int]:
        return next(self._it)

    def _samples(self) -> Iterator[tuple[str, int, int]]:
        key: str | None = None
        best: tuple[str, int, int] | None = None
        for info in self._members():
            name = info.name[2:] if info.name.startswith("./") else info.name
            k, ext = split_key(name)
            if k != key:
                if best is not None:
                    yield best
                key, best = k, None
            if best is None and ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                best = (name, info.offset_data, info.size)
        if best is not None:
            yield best

    def _members(self) -> Iterator[tarfile.TarInfo]:
        with open(self.path, "rb", buffering=1 << 16) as fh:
            end = os.fstat(fh.fileno()).st_size
            tf = tarfile.open(fileobj=fh, mode="r:")
            while True:
                try:
                    info = tf.next()
                except tarfile.TarError as exc:  # "unexpected end of data": a member's data runs past the end
                    self._stop(f"{exc}")
                    return
                tf.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every header it read
                if info is None:
                    self._check_end(fh, tf.offset, end)
                    return
                if info.isreg():
                    yield info
                if info.offset_data + info.size > end:
                    self._stop(f"member {info.name} ends past the end of the file")
                    return

    def _check_end(self, fh: IO[bytes], offset: int, end: int) -> None:
        """tarfile ends silently at a damaged or cut header: tell those apart from a proper end."""
        fh.seek(offset)
        block = fh.read(tarfile.BLOCKSIZE)
        if block and block.count(0) != len(block):
            self._stop(f"unreadable header at byte {offset}" if len(block) == tarfile.BLOCKSIZE
                       else f"cut header at byte {offset}")

    def _stop(self, why: str) -> None:
        self.problem = why
        log.warning("%s: the tar is truncated or damaged (%s); only the samples before that point are read",
                    self.path, why)


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's key and extension: the name up to the first dot of its last path component, and the rest."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext

"""WebDataset tar shards as input (img2dataset's output): one tar, a folder of `*.tar`, or `shards/{00000..00099}.tar`.

A sample is a run of consecutive members sharing a key (WebDataset's rule: the member name up to the first dot of its
last path component); its image is the first member whose extension is an image's (jpg, png, webp, ...); samples
without one (only .json/.txt) are not rows. Row = the sample's position across the tars in the given order; name =
`<tar file name>/<member name>`. Images are read straight from the tar by offset (`read_member`): nothing is
extracted to disk.

The offset table streams: the headers of a tar are scanned once (`tarfile` in "r:" mode seeks over member data, so
only the 512-byte headers are read) into an index file per tar, `<cache>/tar-index/<hash>.jsonl`, keyed by the tar's
path, size, mtime and inode: a JSON header line (sample count, truncation) then one `[member, offset, size]` line per
sample. The cache is `$FEATSHARD_CACHE_DIR`, else `$XDG_CACHE_HOME/featshard`, else `~/.cache/featshard`; where it
cannot be written every pass rescans the headers. Memory stays flat whatever the number of samples.

A tar that ends early (or whose headers stop parsing) keeps the samples before that point: the cut member fails as
`truncated` when read, and a warning names the tar. A tar truncated after the run planned its rows fails the rows
past its end as `truncated` (the workers keep the table made when the run was planned: `TarRef` pins the tar's
identity).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from featshard.errors import FeatshardError, UsageError

log = logging.getLogger("featshard.store.webdataset")

INDEX_FORMAT = "featshard-tar-index/1"
HEADER_WIDTH = 1024  # the index's first line is rewritten in place once the count is known
IMAGE_EXTS = frozenset("jpg jpeg jpe jfif png webp bmp tif tiff gif ppm pgm pbm".split())
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


@dataclass(frozen=True)
class TarMember:
    """An image inside an uncompressed tar: `size` bytes at byte `offset` of `tar` (an absolute path)."""

    tar: str
    offset: int
    size: int

    def key(self) -> str:
        """The member's identity in the input hash."""
        return f"{self.tar}#{self.offset}+{self.size}"


@dataclass(frozen=True)
class TarRef:
    """A tar as it was when the input was opened: its index is found by this identity."""

    path: str
    size: int
    mtime_ns: int
    inode: int


class MemberTruncated(OSError):
    """The tar ends before the member's last byte."""


def is_brace_pattern(text: str) -> bool:
    return bool(_BRACE.search(text)) and any(".." in m or "," in m for m in _BRACE.findall(text))


def brace_expand(pattern: str) -> list[str]:
    """`a{00..02}b{x,y}` -> a00bx a00by a01bx ...: ranges keep the zero padding of their bounds, lists expand as
    given; several groups expand left to right (the last varies fastest), like bash and WebDataset's braceexpand."""
    parts: list[list[str]] = []
    pos = 0
    for m in _BRACE.finditer(pattern):
        parts.append([pattern[pos:m.start()]])
        parts.append(_alternatives(m.group(1)))
        pos = m.end()
    parts.append([pattern[pos:]])
    return ["".join(p) for p in itertools.product(*parts)]


def _alternatives(body: str) -> list[str]:
    m = _RANGE.match(body)
    if not m:
        return body.split(",")
    lo, hi = int(m.group(1)), int(m.group(2))
    width = max(len(m.group(1)), len(m.group(2))) if body.startswith("0") or m.group(2).startswith("0") else 0
    step = 1 if hi >= lo else -1
    return [str(i).zfill(width) for i in range(lo, hi + step, step)]


def expand_pattern(pattern: str) -> list[str]:
    """The tars of a brace pattern, all of which must exist."""
    paths = [os.path.abspath(os.path.expanduser(p)) for p in brace_expand(pattern)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if len(missing) == len(paths):
        raise UsageError(f"--input {pattern!r}: the brace pattern matches no file ({len(paths)} names tried, "
                         f"e.g. {paths[0]!r})")
    if missing:
        raise UsageError(f"--input {pattern!r}: {len(missing)} of the {len(paths)} tars do not exist "
                         f"(e.g. {', '.join(missing[:3])}); give the ones that exist (a folder of *.tar, or a "
                         "narrower pattern)")
    return paths


def folder_tars(folder: str) -> list[str]:
    """The `*.tar` files at the top of `folder`, in sorted order."""
    return sorted(e.path for e in os.scandir(folder) if e.name.endswith(".tar") and e.is_file())


def open_tars(paths: list[str], what: str) -> tuple[TarRef, ...]:
    """Check that every path is a readable uncompressed tar (its first header parses); UsageError otherwise."""
    return tuple(_check_tar(p, what) for p in paths)


def _check_tar(path: str, what: str) -> TarRef:
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            head = fh.read(tarfile.BLOCKSIZE)
            fh.seek(0)
            if not stat.S_ISREG(st.st_mode) or not head:
                raise tarfile.ReadError("empty file" if stat.S_ISREG(st.st_mode) else "not a regular file")
            tarfile.open(fileobj=fh, mode="r:").close()
    except OSError as exc:
        raise UsageError(f"--input {what}: cannot read {path}: {exc}") from exc
    except tarfile.TarError as exc:
        hint = " (gzip-compressed: featshard reads uncompressed tars by offset)" if head[:2] == b"\x1f\x8b" else ""
        raise UsageError(f"--input {what}: {path} is not a tar file ({exc}){hint}") from exc
    return TarRef(os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)


def iter_samples(refs: tuple[TarRef, ...], start: int = 0,
                 stop: int | None = None) -> Iterator[tuple[str, TarMember]]:
    """(name, member) of the samples at positions [start, stop) across the tars, streamed from their indexes."""
    row = 0
    for ref in refs:
        if stop is not None and row >= stop:
            return
        with _entries(ref) as (count, entries):
            if row + count <= start:
                row += count
                continue
            base = os.path.basename(ref.path)
            last = None if stop is None else stop - row
            for member, offset, size in itertools.islice(entries, max(0, start - row), last):
                yield f"{base}/{member}", TarMember(ref.path, offset, size)
            row += count


def read_member(member: TarMember) -> bytes:
    """The member's bytes; FileNotFoundError/PermissionError/... as for a file, MemberTruncated if the tar ends
    before the member does."""
    with open(member.tar, "rb") as fh:
        end = os.fstat(fh.fileno()).st_size
        data = b""
        if member.offset + member.size <= end:
            fh.seek(member.offset)
            data = fh.read(member.size)
    if len(data) != member.size:
        raise MemberTruncated(f"the tar {os.path.basename(member.tar)} ends at byte {end}, before this member "
                              f"(bytes {member.offset}..{member.offset + member.size}): the tar is truncated")
    return data


def cache_dir() -> Path:
    root = os.environ.get("FEATSHARD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "featshard")
    return Path(root) / "tar-index"


def index_path(ref: TarRef) -> Path:
    key = f"{ref.path}\0{ref.size}\0{ref.mtime_ns}\0{ref.inode}".encode("utf-8", "surrogateescape")
    return cache_dir() / f"{hashlib.sha256(key).hexdigest()[:32]}.jsonl"


class _entries:
    """Context manager: (sample count, iterator of (member, offset, size)) of one tar, from its index file (built
    first when missing), or from a fresh header scan where the cache cannot be written."""

    def __init__(self, ref: TarRef) -> None:
        self.ref, self.fh = ref, None

    def __enter__(self) -> tuple[int, Iterator[tuple[str, int, int]]]:
        path = ensure_index(self.ref)
        if path is None:
            count = sum(1 for _ in scan_tar(self.ref.path))
            return count, scan_tar(self.ref.path)
        self.fh = open(path, encoding="utf-8")
        header = json.loads(self.fh.readline())
        return int(header["samples"]), (tuple(json.loads(line)) for line in self.fh)  # type: ignore[misc]

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
    from featshard.store.shards import atomic_replace

    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(" " * (HEADER_WIDTH - 1) + "\n")
            scan = scan_tar(ref.path)
            count = 0
            for entry in scan:
                fh.write(json.dumps(list(entry)) + "\n")
                count += 1
            header = json.dumps({"format": INDEX_FORMAT, "size": ref.size, "mtime_ns": ref.mtime_ns,
                                 "samples": count, "problem": scan.problem[:500]})
            fh.seek(0)
            fh.write(header.ljust(HEADER_WIDTH - 1))
        atomic_replace(tmp, str(path))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class scan_tar:
    """Iterator of (member name, data offset, size) of each sample's image, in tar order, reading headers only.
    After iteration, `problem` says why the tar ended early ("" when it ended properly)."""

    def __init__(self, path: str) -> None:
        self.path, self.problem = path, ""
        self._it = self._samples()

    def __iter__(self) -> "scan_tar":
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
                tf.members.clear()  # tarfile keeps every header it read: not for millions of members
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

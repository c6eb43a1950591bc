"""WebDataset tar shards as input (img2dataset's output): one tar, a folder of `*.tar`, or `shards/{00000..00099}.tar`.

A sample is a run of consecutive members sharing a key (WebDataset's rule: the member name up to the first dot of its
last path component); its image is the first member whose extension is an image's (jpg, png, webp, ...); samples
without one (only .json/.txt) are not rows. Row = the sample's position across the tars in the given order; name =
`<tar file name>/<member name>`. Images are read straight from the tar by offset (`read_member`): nothing is
extracted to disk. The member tables stream from per-tar index files (`featshard.store.tarindex`), so memory stays
flat whatever the number of samples.

A tar truncated after the run planned its rows fails the rows past its end as `truncated` (the workers keep the table
made when the run was planned: `TarRef` pins the tar's identity).
"""
from __future__ import annotations

import itertools
import os
import re
import stat
import tarfile
from dataclasses import dataclass
from typing import Iterator

from featshard.errors import UsageError
from featshard.store.tarindex import TarEntries, TarRef

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
        with TarEntries(ref) as (count, samples):
            if row + count <= start:
                row += count
                continue
            base = os.path.basename(ref.path)
            last = None if stop is None else stop - row
            for member, offset, size in itertools.islice(samples, max(0, start - row), last):
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

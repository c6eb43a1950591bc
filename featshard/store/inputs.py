"""Input reader: a text list, a CSV/TSV with a `path` column, or a directory; streamed, never loaded whole.

The row number (0-based position in the order this module yields) is an image's global id everywhere.
"""
from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator

from featshard.errors import UsageError

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .png .webp .bmp .tif .tiff .gif .ppm .pgm .pbm .jfif".split()
)


@dataclass(frozen=True)
class Item:
    row: int
    name: str
    path: str


@dataclass(frozen=True)
class InputSource:
    """Where the rows come from. `kind` is 'list', 'csv', 'tsv' or 'dir'; `path` is absolute."""

    path: str
    kind: str

    @property
    def base(self) -> str:
        return self.path if self.kind == "dir" else os.path.dirname(self.path)


def open_input(path: str | os.PathLike[str]) -> InputSource:
    """Check `path` and decide how to read it; raise UsageError with a clear message when it cannot be used."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"--input {str(path)!r} does not exist")
    if p.is_dir():
        return InputSource(str(p.resolve()), "dir")
    if not os.access(p, os.R_OK):
        raise UsageError(f"--input {str(path)!r} is not readable")
    suffix = p.suffix.lower()
    kind = {".csv": "csv", ".tsv": "tsv"}.get(suffix, "list")
    source = InputSource(str(p.resolve()), kind)
    if kind != "list":
        _csv_columns(source)  # validates the header early
    return source


def iter_items(source: InputSource, start: int = 0, stop: int | None = None) -> Iterator[Item]:
    """Yield items with rows in [start, stop) in input order, streaming from disk."""
    gen = {"list": _iter_list, "csv": _iter_csv, "tsv": _iter_csv, "dir": _iter_dir}[source.kind](source)
    for row, (name, path) in enumerate(islice(gen, start, stop), start=start):
        yield Item(row, name, path)


def scan_input(source: InputSource) -> tuple[int, str]:
    """One streaming pass: the number of rows and a sha256 of every (name, path) in order."""
    digest = hashlib.sha256()
    count = 0
    for item in iter_items(source):
        digest.update(item.name.encode("utf-8", "surrogateescape") + b"\0")
        digest.update(item.path.encode("utf-8", "surrogateescape") + b"\n")
        count += 1
    return count, digest.hexdigest()


def _resolve(base: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base, path)


def _iter_list(source: InputSource) -> Iterator[tuple[str, str]]:
    base = source.base
    with open(source.path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        for line in fh:
            name = line.rstrip("\r\n")
            stripped = name.strip()
            if not stripped or stripped.startswith("#"):
                continue
            yield name, _resolve(base, name)


def _csv_columns(source: InputSource) -> tuple[int, int | None]:
    with open(source.path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        header = next(csv.reader(fh, delimiter=_delimiter(source)), None)
    if not header:
        raise UsageError(f"--input {source.path}: empty {source.kind.upper()} file (expected a header with 'path')")
    cols = [h.strip().lower() for h in header]
    if "path" not in cols:
        raise UsageError(f"--input {source.path}: header {header} has no 'path' column")
    return cols.index("path"), (cols.index("name") if "name" in cols else None)


def _delimiter(source: InputSource) -> str:
    return "\t" if source.kind == "tsv" else ","


def _iter_csv(source: InputSource) -> Iterator[tuple[str, str]]:
    path_col, name_col = _csv_columns(source)
    base = source.base
    with open(source.path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh, delimiter=_delimiter(source))
        next(reader)
        for record in reader:
            if not record or not any(field.strip() for field in record):
                continue
            if path_col >= len(record):
                raise UsageError(f"--input {source.path}: line {reader.line_num} has no 'path' field")
            path = record[path_col]
            name = record[name_col] if name_col is not None and name_col < len(record) else path
            yield name, _resolve(base, path)


def _iter_dir(source: InputSource) -> Iterator[tuple[str, str]]:
    """Depth-first walk with every folder's entries sorted: deterministic without listing the whole tree."""

    def walk(folder: str) -> Iterator[tuple[str, str]]:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from walk(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.relpath(entry.path, source.path), entry.path

    yield from walk(source.path)

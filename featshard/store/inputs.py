"""Input reader: a text list, a CSV/TSV or parquet file with a `path` column, a directory, or WebDataset tars
(`featshard.store.webdataset`); streamed, never loaded whole.

The row number (0-based position in the order this module yields) is an image's global id everywhere. An item's
`path` is a file path, or a `TarMember` (an image inside a tar); `read_item_bytes` reads either.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator

from featshard.errors import UsageError
from featshard.store.webdataset import (TarMember, TarRef, expand_pattern, folder_tars, is_brace_pattern, iter_samples,
                                        open_tars, read_member)

log = logging.getLogger("featshard.store.inputs")
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .png .webp .bmp .tif .tiff .gif .ppm .pgm .pbm .jfif".split()
)


@dataclass(frozen=True)
class Item:
    row: int
    name: str
    path: str | TarMember


@dataclass(frozen=True)
class InputSource:
    """Where the rows come from. `kind` is 'list', 'csv', 'tsv', 'parquet', 'dir' or 'tar'; `path` is absolute (for
    'tar': a tar, a folder of tars or a brace pattern); `tars` pins each tar's identity when the input was opened."""

    path: str
    kind: str
    tars: tuple[TarRef, ...] = ()

    @property
    def base(self) -> str:
        return self.path if self.kind == "dir" else os.path.dirname(self.path)


def open_input(path: str | os.PathLike[str]) -> InputSource:
    """Check `path` and decide how to read it; raise UsageError with a clear message when it cannot be used."""
    p = Path(path).expanduser()
    if not p.exists() and is_brace_pattern(str(path)):
        pattern = os.path.abspath(os.path.expanduser(str(path)))
        return InputSource(pattern, "tar", open_tars(expand_pattern(pattern), repr(str(path))))
    if not p.exists():
        raise UsageError(f"--input {str(path)!r} does not exist")
    if p.is_dir():
        return _open_dir(str(p.resolve()), str(path))
    if not os.access(p, os.R_OK):
        raise UsageError(f"--input {str(path)!r} is not readable")
    suffix = p.suffix.lower()
    kind = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet", ".tar": "tar"}.get(suffix, "list")
    source = InputSource(str(p.resolve()), kind)
    if kind == "tar":
        return InputSource(source.path, kind, open_tars([source.path], repr(str(path))))
    if kind == "parquet":
        _parquet_columns(source)
    elif kind != "list":
        _csv_columns(source)  # validates the header early
    return source


def _open_dir(folder: str, given: str) -> InputSource:
    """A folder of images (scanned recursively), or of WebDataset tars: *.tar files and no images or subfolders at
    its top (img2dataset's output folder, whose .parquet/.json files are ignored)."""
    tars = folder_tars(folder)
    if tars:
        entries = list(os.scandir(folder))
        if not any(e.is_dir() or os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS for e in entries):
            return InputSource(folder, "tar", open_tars(tars, repr(given)))
        log.warning("--input %s: images are scanned; its %d .tar files are not read (give them as a brace pattern, "
                    "e.g. %s, to read the tars instead)", given, len(tars), os.path.join(folder, "{...}.tar"))
    return InputSource(folder, "dir")


def iter_items(source: InputSource, start: int = 0, stop: int | None = None) -> Iterator[Item]:
    """Yield items with rows in [start, stop) in input order, streaming from disk."""
    if source.kind == "tar":  # skips to `start` by the tars' sample counts
        for row, (name, member) in enumerate(iter_samples(source.tars, start, stop), start=start):
            yield Item(row, name, member)
        return
    gen = {"list": _iter_list, "csv": _iter_csv, "tsv": _iter_csv, "dir": _iter_dir,
           "parquet": _iter_parquet}[source.kind](source)
    for row, (name, path) in enumerate(islice(gen, start, stop), start=start):
        yield Item(row, name, path)


def update_digest(digest: "hashlib._Hash", item: Item) -> None:
    """Add an item's name and path (a tar member: tar, offset, size) to the input hash."""
    digest.update(item.name.encode("utf-8", "surrogateescape") + b"\0")
    digest.update(path_key(item.path).encode("utf-8", "surrogateescape") + b"\n")


def path_key(path: str | TarMember) -> str:
    """An item's path as text (what the input hash covers): a file path, or `TAR#OFFSET+SIZE` for a tar member."""
    return path.key() if isinstance(path, TarMember) else path


def path_from_key(text: str, kind: str) -> str | TarMember:
    """`path_key` read back, for an input of `kind` (InputSource.kind: every path of a 'tar' input is a member)."""
    if kind != "tar":
        return text
    tar, _, span = text.rpartition("#")
    offset, _, size = span.partition("+")
    return TarMember(tar, int(offset), int(size))


def scan_input(source: InputSource) -> tuple[int, str]:
    """One streaming pass: the number of rows and a sha256 of every (name, path) in order."""
    digest = hashlib.sha256()
    count = 0
    for item in iter_items(source):
        update_digest(digest, item)
        count += 1
    return count, digest.hexdigest()


def item_for_row(source: InputSource, row: int) -> Item | None:
    """The input item of one row (None past the end): tars skip to it by their sample counts, other kinds stream
    the list up to it."""
    return next(iter_items(source, row, row + 1), None)


def read_item_bytes(item: Item | str | TarMember) -> bytes:
    """The bytes of an input image (an Item, or its `path`): a file, or a member read from its tar by offset.
    Raises OSError (FileNotFoundError, PermissionError, `webdataset.MemberTruncated`, ...) when it cannot be read."""
    path = item.path if isinstance(item, Item) else item
    if isinstance(path, TarMember):
        return read_member(path)
    with open(path, "rb") as fh:
        return fh.read()


def item_size(path: str | TarMember) -> int:
    """Size in bytes of an input image, without reading it (OSError when a file cannot be stat'ed)."""
    return path.size if isinstance(path, TarMember) else os.stat(path).st_size


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


PARQUET_BATCH = 8192


def _parquet_columns(source: InputSource) -> tuple[str, str | None]:
    """The `path` and optional `name` columns (matched case-insensitively, like the CSV header)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise UsageError(f"--input {source.path}: reading parquet needs pyarrow (pip install "
                         "'featshard[parquet]')") from exc
    try:
        names = pq.read_schema(source.path).names
    except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError: all mean the file cannot be used
        raise UsageError(f"--input {source.path}: not a readable parquet file: {exc}") from exc
    cols = {n.strip().lower(): n for n in names}
    if "path" not in cols:
        raise UsageError(f"--input {source.path}: parquet columns {names} have no 'path' column")
    return cols["path"], cols.get("name")


def _iter_parquet(source: InputSource) -> Iterator[tuple[str, str]]:
    """Record batches of the `path` (and `name`) columns only; rows with a null or blank path are skipped like
    blank lines; a null name is the path."""
    import pyarrow.parquet as pq

    path_col, name_col = _parquet_columns(source)
    base = source.base
    pf = pq.ParquetFile(source.path)
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=[c for c in (path_col, name_col) if c]):
            paths = batch.column(0).to_pylist()
            names = batch.column(1).to_pylist() if name_col else paths
            for path, name in zip(paths, names):
                path = _text(path)
                if not path.strip():
                    continue
                yield (path if name is None else _text(name)), _resolve(base, path)
    finally:
        pf.close()


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)

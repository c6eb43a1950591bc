"""The one atomic writer every file of featshard goes through: temp file, fsync, rename, fsync the folder.

A reader (or a crash at any instant) sees the old file or the new one, never half of one; once `write_atomic` returns,
the new file survives a power cut. The temp file is `<path>.tmp-<pid>`: what a killed writer leaves is recognisable,
and `featshard.runner.resume` / the coordinator remove it when the same work starts again. A failed write removes its
temp file (it may be what filled the disk) and raises.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

TMP_MARK = ".tmp-"


def tmp_path(path: str | os.PathLike[str]) -> str:
    """The temp name this process writes `path` through."""
    return f"{os.fspath(path)}{TMP_MARK}{os.getpid()}"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_atomic(path: str | os.PathLike[str], content: bytes | str | Callable[[str], Any],
                 mode: int | None = None) -> None:
    """Write `path` atomically. `content`: bytes, text (utf-8), or a function that writes the file named by its
    argument (h5py, faiss, ...) and raises if what it wrote is wrong. `mode`: permission bits of the new file."""
    final = os.fspath(path)
    tmp = tmp_path(final)
    try:
        if callable(content):
            content(tmp)
        else:
            data = content.encode("utf-8") if isinstance(content, str) else content
            with open(tmp, "wb") as fh:
                fh.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
        fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(final)))


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """JSON (sorted keys, indented, utf-8, trailing newline) through `write_atomic`."""
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    write_atomic(path, text)

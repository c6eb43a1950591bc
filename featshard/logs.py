"""Logging set-up shared by the CLI, pool workers and SLURM tasks."""
from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg, unused-ignore]
    """Writes to whatever sys.stderr is at emit time (pytest and tools swap it, the live run display redirects it)."""

    @property  # type: ignore[override, unused-ignore]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def stderr_handler() -> logging.Handler:
    """A handler printing records to the current sys.stderr in the project's format."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT, datefmt=DATEFMT))
    return handler


def setup_logging(level: str | int | None = None, handler: logging.Handler | None = None) -> None:
    """Configure the root logger once per process (stderr, or `handler`: a pool worker's goes to the coordinator);
    stderr, so stdout stays clean for --json. A later call changes the level only when it names one."""
    root = logging.getLogger()
    if getattr(root, "_featshard_configured", False):
        if level is not None:
            root.setLevel(level)
        return
    root.addHandler(handler or stderr_handler())
    root.setLevel(level or default_level())
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every SIMD variant it tries
    root._featshard_configured = True  # type: ignore[attr-defined]


def default_level() -> str:
    return os.environ.get("FEATSHARD_LOG", "INFO")

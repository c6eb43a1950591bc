"""Logging set-up shared by the CLI, pool workers and SLURM tasks."""
from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at emit time (pytest and tools swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def setup_logging(level: str | int | None = None) -> None:
    """Configure the root logger once per process (stderr, so stdout stays clean for --json)."""
    level = level or os.environ.get("FEATSHARD_LOG", "INFO")
    root = logging.getLogger()
    if getattr(root, "_featshard_configured", False):
        root.setLevel(level)
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every SIMD variant it tries
    root._featshard_configured = True  # type: ignore[attr-defined]

"""Logging set-up shared by the CLI, pool workers and SLURM tasks."""
from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def setup_logging(level: str | int | None = None) -> None:
    """Configure the root logger once per process (stderr, so stdout stays clean for --json)."""
    level = level or os.environ.get("FEATSHARD_LOG", "INFO")
    root = logging.getLogger()
    if getattr(root, "_featshard_configured", False):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    root._featshard_configured = True  # type: ignore[attr-defined]

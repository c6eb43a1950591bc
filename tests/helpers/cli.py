"""Running the real CLI as a user would, and reading a run's shards back."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 300, check: bool = False, env: dict[str, str] | None = None,
        **kw: object) -> subprocess.CompletedProcess[str]:
    """Run `python -m featshard ARGS` as a user would; returns the completed process (text)."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "featshard", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=str(REPO), **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise AssertionError(f"featshard {' '.join(args)} -> {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def read_all(run: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every dataset of every finished shard of a run, by file name."""
    import h5py

    from featshard.store import shards

    out = {}
    for path in sorted((run / "shards").glob("shard-*.h5")):
        with h5py.File(path, "r") as h5:
            out[path.name] = {k: h5[k][...] for k in shards.DATASETS}
    return out


# --graph eager: the same vectors in every test run (auto picks by timing); tests of auto pass it themselves
FAST = ["--model", "mobilenet_v2", "--batch-size", "4", "--loader-workers", "1", "--precision", "fp32",
        "--graph", "eager"]

"""featshard.runner.runtime: malloc thresholds (in a fresh process: they are process-wide) and the worker
environment."""
from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO

from featshard.runner.runtime import tune_malloc


def _in_fresh_process(code: str, **env: str) -> str:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "FEATSHARD_"))}
    out = subprocess.run([sys.executable, "-c", code], env={**full, "PYTHONPATH": str(REPO), **env},
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip()


def test_tune_malloc_sets_the_thresholds_once() -> None:
    code = "from featshard.runner.runtime import tune_malloc; print(tune_malloc(), tune_malloc())"
    assert _in_fresh_process(code) == "tuned already"


def test_tune_malloc_stops_page_faults_on_big_buffers() -> None:
    """A 64 MB buffer allocated and freed 20 times: untuned, glibc mmaps (and faults in) it every time."""
    code = """
import resource, numpy as np
from featshard.runner.runtime import tune_malloc
tuned = tune_malloc() if TUNE else "off"
np.ones(1 << 24, np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    np.ones(1 << 24, np.float32)
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    off = _in_fresh_process(code.replace("TUNE", "False")).split()
    on = _in_fresh_process(code.replace("TUNE", "True")).split()
    assert on[0] == "tuned" and int(on[1]) * 10 < int(off[1]), (on, off)


def test_user_settings_win_and_it_can_be_disabled() -> None:
    assert tune_malloc(env={"MALLOC_MMAP_THRESHOLD_": "65536"}) == "user"
    assert tune_malloc(env={"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}) == "user"
    assert tune_malloc(env={"FEATSHARD_MALLOC": "0"}) == "disabled"

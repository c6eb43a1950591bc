"""backends: the pool's first workers preload heavy modules; its replacement workers do not."""
from __future__ import annotations

import subprocess
import sys

from helpers import REPO


def test_only_the_first_workers_preload() -> None:
    code = ("import multiprocessing as mp, sys; "
            "from featshard.runner.backends import _worker_init; v = mp.Value('i', 1); "
            "_worker_init(('colorsys',), v); first = 'colorsys' in sys.modules; "
            "_worker_init(('wave', 'no_such_module_here'), v); print(first, 'wave' in sys.modules, v.value)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["True", "False", "0"]


def test_a_module_that_fails_to_import_does_not_fail_the_worker() -> None:
    code = ("import multiprocessing as mp; from featshard.runner.backends import _worker_init; "
            "_worker_init(('no_such_module_here',), mp.Value('i', 2)); print('alive')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "alive"

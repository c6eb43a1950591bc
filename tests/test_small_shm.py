"""A run in a container-sized /dev/shm (Docker's and Kubernetes' default is 64 MB), for real: a small tmpfs mounted on
/dev/shm in a private mount namespace (`unshare -m`, root only). Before, batches that did not fit were dropped by
the loader's queue thread, the worker waited out the loader's timeout and recorded the rows as failed `timeout`
(main, 32 MiB, these options: rows recorded failed and minutes lost); now the loaders and their prefetch are sized to
fit, saying so, or the run stops at once naming --shm-size."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import make_images, write_list
from test_stream import in_small_shm

OPTS = ["--gpus", "cpu:2", "--weights", "none", "--model", "mobilenet_v2", "--precision", "fp32", "--graph", "eager",
        "--loader-workers", "6", "--image-timeout", "3"]


def run_in(mib: int, lst: Path, out: Path, *extra: str) -> tuple[int, str]:
    proc = in_small_shm(mib, [sys.executable, "-m", "featshard", "run", "--input", str(lst), "--out", str(out),
                              *OPTS, *extra])
    return proc.returncode, proc.stderr


@pytest.mark.slow
def test_a_run_fits_its_loaders_to_a_small_dev_shm(tmp_path: Path) -> None:
    lst = write_list(tmp_path / "list.txt", make_images(tmp_path / "imgs", 20) * 20)  # 400 rows, 200 per worker
    code, err = run_in(32, lst, tmp_path / "run", "--batch-size", "32")
    assert code == 0, err[-4000:]
    assert "/dev/shm has 32.0 MiB free: 1 loader process(es) x 1 prefetched batch(es)" in err
    assert "docker run --shm-size" in err and "No space left" not in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["ok"], summary["failed"], summary["complete"]) == (400, 0, True)


def test_a_dev_shm_too_small_for_one_batch_stops_at_once(tmp_path: Path) -> None:
    lst = write_list(tmp_path / "list.txt", make_images(tmp_path / "imgs", 2))
    code, err = run_in(16, lst, tmp_path / "run", "--batch-size", "64")
    assert code == 2 and "/dev/shm is too small: 16.0 MiB free" in err and "--shm-size" in err, err[-3000:]
    assert "lower --batch-size to 22 or less" in err
    assert not list((tmp_path / "run" / "shards").glob("*.progress.json"))  # no worker was started

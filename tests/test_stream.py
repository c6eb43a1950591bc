"""BatchStream: what the loader machinery fails with fails the shard (a LoaderFault with the traceback), never rows
recorded as bad images; a chunk lost whole to one infrastructure reason fails it too. The /dev/shm case is real: a
tmpfs of a few MiB mounted on /dev/shm in a private mount namespace (`unshare -m`, root only)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, make_images, write_list

from featshard.extract.batch import Batch
from featshard.extract.stream import GAVE_UP, ChunkWatch, LoaderFault, classify, infra_key


def batch(rows: list[int], failed: dict[int, str]) -> Batch:
    empty = torch.zeros((0, 0, 0, 3), dtype=torch.uint8)
    return Batch(rows, [str(r) for r in rows], empty, list(failed), [str(r) for r in failed], list(failed.values()))


def test_infrastructure_reasons_are_told_from_bad_images() -> None:
    assert infra_key("timeout: no result within 60 s (open + decode)") == "timeout"
    assert infra_key(f"timeout: {GAVE_UP} of 64 (DataLoader timed out after 540.0 seconds); retry") == "timeout"
    assert infra_key("error: OSError: [Errno 5] Input/output error: '/mnt/a.jpg'") == "error: OSError"
    assert infra_key(f"error: {GAVE_UP} of 8 (DataLoader worker (pid 77) is killed by signal)") == "error: loader"
    for bad in ("missing: No such file or directory", "corrupt: broken data stream", "not_image: cannot identify"):
        assert infra_key(bad) is None


def test_a_chunk_lost_whole_to_one_infrastructure_reason_fails_the_shard() -> None:
    hung = "timeout: no result within 3 s (open + decode)"
    watch = ChunkWatch("s", [(0, 4), (4, 8), (8, 9)])
    watch.check(batch([], {0: hung, 1: hung}))
    with pytest.raises(LoaderFault, match=r"every row of chunk \[0, 4\) failed with the same infrastructure"):
        watch.check(batch([], {2: hung, 3: hung}))  # raised before the chunk's last batch is handed on
    watch.check(batch([4], {5: hung, 6: hung, 7: hung}))  # one row decoded: a few stuck files, recorded
    watch.check(batch([], {8: hung}))  # a chunk of one row: one stuck file is no pattern
    mixed = ChunkWatch("s", [(0, 4)])
    mixed.check(batch([], {0: hung, 1: "missing: gone"}))
    mixed.check(batch([], {2: hung, 3: hung}))
    images = ChunkWatch("s", [(0, 2)])
    images.check(batch([], {0: "not_image: cannot identify image file", 1: "not_image: cannot identify image file"}))


def test_torch_loader_errors_are_classified() -> None:
    wrapped = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent ...")
    assert classify(wrapped) == "fault" and classify(KeyError("Caught KeyError in DataLoader worker process 3.")) \
        == "fault"
    assert classify(RuntimeError("Pin memory thread exited unexpectedly")) == "fault"
    assert classify(RuntimeError("DataLoader timed out after 120.0 seconds")) == "stalled"
    assert classify(RuntimeError("DataLoader worker (pid 123) is killed by signal: Killed. ")) == "died"
    assert classify(ConnectionResetError(104, "Connection reset by peer")) == "died"
    assert classify(ValueError("something else")) is None


def can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def in_small_shm(mib: int, argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run argv with a `mib` MiB tmpfs on /dev/shm (a private mount namespace: the machine's /dev/shm is untouched)."""
    if not can_unshare():
        pytest.skip("needs root and unshare -m to mount a small /dev/shm")
    script = f'mount -t tmpfs -o size={mib}m tmpfs /dev/shm && exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


STREAM = """
import sys
from featshard.extract.models import preprocess_for
from featshard.extract.stream import BatchStream, LoaderFault
from featshard.store.inputs import open_input
stream = BatchStream("s", open_input(sys.argv[1]), [(0, 48)], preprocess_for("mobilenet_v2", "none"), 16, 1, False)
failed = 0
try:
    for b in stream:
        failed += len(b.failed_rows)
except LoaderFault as exc:
    print("FAULT", failed, exc)
else:
    print("NO FAULT", failed)
"""


@pytest.mark.slow
def test_a_full_dev_shm_fails_the_shard_with_the_traceback(tmp_path: Path) -> None:
    lst = write_list(tmp_path / "list.txt", make_images(tmp_path / "imgs", 4) * 12)
    proc = in_small_shm(3, [sys.executable, "-c", STREAM, str(lst)])  # room for one 2.3 MiB batch, not two
    assert proc.stdout.startswith("FAULT 0 "), proc.stdout + proc.stderr[-3000:]
    assert "No space left on device" in proc.stdout and "--shm-size" in proc.stdout
    assert "Original Traceback" in proc.stdout and "stack_pixels" in proc.stdout


DIES_DURING_MODEL_LOAD = """
import os, signal, sys, time
import psutil
from featshard.extract.models import preprocess_for
from featshard.extract.stream import BatchStream
from featshard.store.inputs import open_input
stream = BatchStream("s", open_input(sys.argv[1]), [(0, 48)], preprocess_for("mobilenet_v2", "none"), 8, 2, False)
stream.start()
loaders = psutil.Process().children()
time.sleep(0.5)
os.kill(loaders[0].pid, signal.SIGKILL)
time.sleep(2)  # the worker builds its model here: the loader's death must not be raised inside the build
rows, failed = [], []
for b in stream:
    rows += b.rows
    failed += b.failed_rows
print("DELIVERED", len(loaders), sorted(rows) == list(range(48)), failed)
"""


def test_a_loader_killed_while_the_model_loads_is_replaced_at_the_first_fetch(tmp_path: Path) -> None:
    """Loaders start before the model is built; torch's SIGCHLD handler raised a loader's death wherever the worker
    was (inside the model's graph tracing: the shard failed as a usage error). Now the first fetch reports it, the
    loader is replaced and every row is delivered once, none failed."""
    lst = write_list(tmp_path / "list.txt", make_images(tmp_path / "imgs", 4) * 12)
    proc = subprocess.run([sys.executable, "-c", DIES_DURING_MODEL_LOAD, str(lst)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.stdout.strip() == "DELIVERED 2 True []", proc.stdout + proc.stderr[-3000:]
    assert "starting a new loader" in proc.stderr

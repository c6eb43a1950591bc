"""Real write failures, not mocks: a file-size limit (RLIMIT_FSIZE: writes fail with EFBIG), a full filesystem and
a read-only one (a tiny tmpfs). Each gives a clear error and a non-zero status, marks no shard complete, keeps the
finished chunks, and the same command resumes once the cause is gone."""
from __future__ import annotations

import resource
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from helpers import cli
from test_resume import ROWS, assert_same_output, durable, run_args, shared_reference, summary

from featshard.store import shards
from featshard.store.rundir import RunDir

SHARDS = ("shard-00000-of-00002", "shard-00001-of-00002")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return shared_reference(tmp_path_factory)


def no_shard_complete(out: Path) -> bool:
    return not any(shards.is_complete(RunDir(out).shard(name)) for name in SHARDS)


def limit_file_size(limit: int) -> None:
    """preexec_fn: every process of the run may write files of at most `limit` bytes; a bigger write fails with
    EFBIG instead of killing the process with SIGXFSZ (Python ignores SIGXFSZ too; be explicit)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_file_size_limit_fails_finalize_then_resumes(reference: tuple[Path, Path], tmp_path: Path) -> None:
    lst, ref = reference
    out = tmp_path / "run"
    # 64 kB: a 2-row chunk file (~28 kB) fits, a 12-row shard file (~100 kB) does not. The limit holds for every
    # file the run's processes write, torch's shared-memory files for loader batches too: decode in the worker.
    failed = cli(*run_args(lst, out, "--loader-workers", "0"), preexec_fn=lambda: limit_file_size(64 << 10))
    assert failed.returncode == 1, failed.stderr
    assert "cannot write" in failed.stderr and "File too large" in failed.stderr
    assert "rerun the same command" in failed.stderr
    assert no_shard_complete(out) and durable(out) == {name: ROWS // 2 for name in SHARDS}  # all chunks kept
    assert not list((out / "shards").rglob("*.tmp-*"))
    assert summary(out)["complete"] is False
    cli(*run_args(lst, out), check=True)
    s = summary(out)
    assert (s["resumed_rows"], s["processed_rows"]) == (ROWS, 0)  # only the shard files were written
    assert_same_output(out, ref)


@pytest.fixture()
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def remount(mnt: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True)


def test_full_then_read_only_filesystem_then_resume(reference: tuple[Path, Path], tiny_fs: Path) -> None:
    lst, ref = reference
    out = tiny_fs / "run"
    full = cli(*run_args(lst, out))
    assert full.returncode == 1, full.stderr
    assert "No space left on device" in full.stderr and "did not complete" in full.stderr
    assert no_shard_complete(out)
    kept = sum(durable(out).values())
    remount(tiny_fs, "ro")
    ro = cli(*run_args(lst, out))
    assert ro.returncode == 1 and "Read-only file system" in ro.stderr, ro.stderr
    remount(tiny_fs, "rw,size=128m")  # space freed
    cli(*run_args(lst, out), check=True)
    assert summary(out)["resumed_rows"] == kept
    assert_same_output(out, ref)

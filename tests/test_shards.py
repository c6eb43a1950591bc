from __future__ import annotations

import h5py
import numpy as np

from featshard.store import shards


def _block(rows, dim=4, failed=()):
    rng = np.random.default_rng(0)
    return shards.Block(rows=np.array(rows, np.int64), names=[f"img {r} ü" for r in rows],
                        features=rng.normal(size=(len(rows), dim)).astype(np.float32),
                        failed_rows=np.array(failed, np.int64), failed_names=[f"bad{r}" for r in failed],
                        failed_reasons=["missing: gone"] * len(failed))


def test_write_block_is_atomic_and_readable(tmp_path):
    path = tmp_path / "c.h5"
    shards.write_block(path, _block([0, 2], failed=[1]), {"fingerprint": "abc", "preprocess": {"crop": 224}}, 4,
                       "float32")
    assert shards.is_complete(path)
    assert not list(tmp_path.glob("*.tmp-*"))
    back = shards.read_block(path)
    assert back.rows.tolist() == [0, 2] and back.names == ["img 0 ü", "img 2 ü"]
    assert back.failed_reasons == ["missing: gone"]
    attrs = shards.read_attrs(path)
    assert attrs["fingerprint"] == "abc" and attrs["preprocess"] == {"crop": 224} and attrs["complete"] is True


def test_concat_streams_parts_in_order(tmp_path):
    parts = []
    for i, rows in enumerate([[0, 1], [], [4, 5]]):
        p = tmp_path / f"p{i}.h5"
        shards.write_block(p, _block(rows, failed=[2, 3] if i == 1 else []), {}, 4, "float16")
        parts.append(str(p))
    final = tmp_path / "shard.h5"
    assert shards.concat_files(parts, str(final), {"dim": 4}, 4, "float16") == 4
    with h5py.File(final, "r") as h5:
        assert h5["rows"][...].tolist() == [0, 1, 4, 5]
        assert h5["failed_rows"][...].tolist() == [2, 3]
        assert h5["features"].dtype == np.float16 and h5["features"].shape == (4, 4)
        assert bool(h5.attrs["complete"])
    assert shards.names_for_rows(final, np.array([5, 3, 0])) == ["img 5 ü", None, "img 0 ü"]
    got = list(shards.iter_features(final, batch_rows=3))
    assert [r.tolist() for r, _ in got] == [[0, 1, 4], [5]]


def test_torn_file_is_not_complete(tmp_path):
    bad = tmp_path / "torn.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 10)
    assert not shards.is_complete(bad)
    assert not shards.is_complete(tmp_path / "missing.h5")


def test_surrogate_names_are_stored(tmp_path):
    name = b"caf\xe9.jpg".decode("utf-8", "surrogateescape")
    blk = shards.Block(np.array([0]), [name], np.zeros((1, 2), np.float32))
    shards.write_block(tmp_path / "s.h5", blk, {}, 2, "float32")
    assert shards.read_block(tmp_path / "s.h5").names == ["caf\\xe9.jpg"]


FORK_WHILE_WRITING = """
import os, signal, sys, time
import numpy as np
from featshard.store import shards
children = []
create = shards._create


def create_then_fork(*args, **kwargs):
    create(*args, **kwargs)
    if not children:  # a loader forked while the chunk file is open: it inherits the descriptor
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children.append(pid)


shards._create = create_then_fork
block = shards.Block(np.arange(3, dtype=np.int64), ["a", "b", "c"], np.ones((3, 4), np.float32))
try:
    shards.write_block(sys.argv[1], block, {}, 4, "float32")
    print("WRITTEN", shards.read_block(sys.argv[1]).rows.tolist())
finally:
    os.kill(children[0], signal.SIGKILL)
    os.waitpid(children[0], 0)
"""


def test_a_process_forked_while_a_chunk_is_written_does_not_block_its_read_back(tmp_path):
    """The worker forks replacement loaders while its chunk writer thread has a chunk file open; with HDF5's file
    lock, the child's inherited descriptor kept the lock and the read-back failed (errno 11), failing the shard."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", FORK_WHILE_WRITING, str(tmp_path / "c.h5")], capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip() == "WRITTEN [0, 1, 2]", proc.stdout + proc.stderr[-2000:]

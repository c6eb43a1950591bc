"""Resume at chunk granularity through the real CLI: SIGKILL of the whole process tree at several points, a worker
SIGKILLed and retried, a kill mid-finalize, `--retry-failed`, and refused config changes.

The helpers at the top are shared with test_signals.py, test_write_errors.py and test_verify.py (imported from here).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from helpers import FAST, REPO, cli, make_images, read_all, write_list

from featshard.store import shards
from featshard.cli import main
from featshard.store.rundir import RunDir

pytestmark = pytest.mark.slow  # runs the real pipeline: `make test-fast` leaves it out

CHUNK = 2
ROWS = 24  # 2 shards of 12 rows, 6 chunks each


# ---- shared helpers ------------------------------------------------------------------------------------------------
def shared_reference(factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(list, clean run) made once per pytest session and shared by the modules that compare against it."""
    root = factory.getbasetemp() / "featshard-reference"
    lst, run = root / "list.txt", root / "run"
    if not (run / "summary.json").is_file():
        images = make_images(root / "imgs", 7)
        write_list(lst, [*images, *images, *images[:6], "imgs/missing.jpg", *images[:3]])  # row 20 is missing
        cli(*run_args(lst, run), check=True)
    return lst, run


def run_args(lst: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--input", str(lst), "--out", str(out), "--gpus", "cpu:2", "--weights", "none",
            "--chunk-size", str(CHUNK), *FAST, "--batch-size", "2", *extra]


def start(args: list[str], **kw: Any) -> subprocess.Popen[str]:
    """The real CLI in its own session (so the whole tree can be killed with killpg)."""
    return subprocess.Popen([sys.executable, "-m", "featshard", *args], cwd=REPO, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, start_new_session=True, **kw)


def wait_for(what: str, check: Callable[[], Any], proc: subprocess.Popen[str] | None = None,
             timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def progress(out: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for path in (out / "shards").glob("*.progress.json"):
        try:
            found[path.name.split(".")[0]] = json.loads(path.read_text())
        except ValueError:
            pass
    return found


def durable(out: Path, per_shard: int = ROWS // 2) -> dict[str, int]:
    """Rows per shard on disk: a complete shard file, else its finished chunk files."""
    result = {}
    for i in range(2):
        name = f"shard-{i:05d}-of-00002"
        if shards.is_complete(RunDir(out).shard(name)):
            result[name] = per_shard
            continue
        parts = RunDir(out).parts(name)
        files = [p for p in parts.glob("chunk-*.h5")] if parts.is_dir() else []
        result[name] = sum(int(p.stem.split("-")[2]) - int(p.stem.split("-")[1]) for p in files)
    return result


def assert_same_output(run: Path, ref: Path, ignore: tuple[str, ...] = ()) -> None:
    a, b = read_all(run), read_all(ref)
    assert a.keys() == b.keys()
    for name in a:
        for key in (k for k in shards.DATASETS if k not in ignore):
            if key == "features":
                np.testing.assert_allclose(a[name][key], b[name][key], rtol=0, atol=1e-5)
            else:
                assert a[name][key].tolist() == b[name][key].tolist(), (name, key)
    assert not list((run / "shards").glob("*.tmp-*")) and not list((run / "shards").glob("*.parts"))
    assert cli("verify", str(run)).returncode == 0


def kill_tree(proc: subprocess.Popen[str]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()


def summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


# ---- tests ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return shared_reference(tmp_path_factory)


def extracting(out: Path) -> bool:
    prog = progress(out)
    return len(prog) == 2 and any(p.get("stage") == "extracting" for p in prog.values())


def mid_chunks(out: Path, before: int, per_shard: int = ROWS // 2, finished_ok: bool = False) -> Callable[[], bool]:
    """True once more than `before` rows are durable and no shard is finished yet; with `finished_ok`, once a shard
    is between chunks (some of its rows durable, not all) whether or not the other one is finished (one worker can
    do its 12 rows before the other has started)."""
    def reached() -> bool:
        done = durable(out, per_shard)
        if finished_ok:
            return sum(done.values()) > before and any(0 < n < per_shard for n in done.values())
        return sum(done.values()) > before and all(n < per_shard for n in done.values())
    return reached


def test_kill_whole_tree_at_several_points_then_rerun_equals_clean_run(reference: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    """kill -9 of coordinator, workers and loaders at once: right after the models loaded, then (in the rerun)
    between chunks; the third run completes. Each kill loses at most the chunk in flight per worker."""
    lst, ref = reference
    out = tmp_path / "run"
    for point in ("model loaded", "mid-chunks"):
        proc = start(run_args(lst, out))
        wait_for(point, (lambda: extracting(out)) if point == "model loaded" else mid_chunks(out, sum(
            durable(out).values()), finished_ok=True), proc)
        kill_tree(proc)
        at_kill, done = durable(out), {k: v.get("rows_done", 0) for k, v in progress(out).items()}
        for name, rows in at_kill.items():
            assert done.get(name, 0) - rows <= CHUNK, (point, name)  # work lost: at most the chunk in flight
        assert (out / "locks" / "node-0000.lock").is_file()  # left by the killed coordinator: stale now
    rerun = cli(*run_args(lst, out), check=True)
    assert "taking over the stale lock" in rerun.stderr
    s = summary(out)
    assert 0 < s["resumed_rows"] == sum(at_kill.values()) and s["processed_rows"] == ROWS - s["resumed_rows"]
    for entry in s["shards"]:  # nothing durable was done again
        assert entry["resumed_rows"] == at_kill[entry["shard"]] == entry["last_attempt"]["resumed_rows"]
    assert_same_output(out, ref)


def test_worker_sigkill_is_retried_from_its_last_chunk(reference: tuple[Path, Path], tmp_path: Path) -> None:
    lst, ref = reference
    out = tmp_path / "run"
    proc = start(run_args(lst, out, "--max-retries", "1"))
    name = wait_for("two finished chunks", lambda: next((k for k, n in durable(out).items() if 2 * CHUNK <= n
                                                         < ROWS // 2), None), proc)
    victim = progress(out)[name]
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for("the worker to die", lambda: not _alive(victim["pid"]))
    at_kill = durable(out)[name]  # the retry needs seconds to start: nothing new is written yet
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"{name}: worker pid {victim['pid']}" in err and "retry 1/1" in err
    entry = {e["shard"]: e for e in summary(out)["shards"]}
    assert entry[name]["retries"] == 1 and entry[name]["retry_resumed_rows"] == [at_kill]
    assert entry[name]["last_attempt"] == {"resumed_rows": at_kill, "processed_rows": ROWS // 2 - at_kill}
    other = next(k for k in entry if k != name)
    assert entry[other]["retries"] == 0  # the other shard kept its work
    assert_same_output(out, ref)


def test_loader_sigkill_is_survived_without_losing_rows(reference: tuple[Path, Path], tmp_path: Path) -> None:
    """A decode process killed (the OOM killer's pick, say): its worker starts a new loader and redoes what the dead
    one had not delivered; no row is lost or recorded as failed."""
    import psutil

    lst, ref = reference
    out = tmp_path / "run"
    proc = start(run_args(lst, out))
    wait_for("a finished chunk", mid_chunks(out, 0), proc)
    workers = [p["pid"] for p in progress(out).values() if p.get("state") == "running"]
    loaders = wait_for("a loader process", lambda: [c for pid in workers for c in psutil.Process(pid).children()
                                                     if "spawn_main" in " ".join(c.cmdline())], proc)
    loaders[0].kill()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "; starting a new loader" in err  # the loss shows as a dead worker, or a batch whose handover failed
    assert summary(out)["failed"] == 1  # row 20 (missing file), as in the clean run
    assert_same_output(out, ref)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def split_into_chunks(run: Path, name: str, fail_rows: set[int] = frozenset()) -> None:
    """Turn a finished shard back into the chunk files a worker writes (as if killed before finalize);
    rows in fail_rows are recorded as failed instead."""
    path = RunDir(run).shard(name)
    block, attrs = shards.read_block(path), shards.read_attrs(path)
    lo, hi = int(attrs["start"]), int(attrs["stop"])
    RunDir(run).parts(name).mkdir(parents=True, exist_ok=True)
    feat = {int(r): (n, f) for r, n, f in zip(block.rows, block.names, block.features)}
    failed = {int(r): (n, m) for r, n, m in zip(block.failed_rows, block.failed_names, block.failed_reasons)}
    for a in range(lo, hi, CHUNK):
        rng = range(a, min(hi, a + CHUNK))
        ok = [r for r in rng if r in feat and r not in fail_rows]
        bad = [r for r in rng if r not in ok]
        names = {**{r: n for r, (n, _) in feat.items()}, **{r: n for r, (n, _) in failed.items()}}
        chunk = shards.Block(np.array(ok, np.int64), [feat[r][0] for r in ok],
                             np.array([feat[r][1] for r in ok], np.float32).reshape(-1, attrs["dim"]),
                             np.array(bad, np.int64), [names[r] for r in bad],
                             [failed[r][1] if r in failed else "missing: gone for a while" for r in bad])
        cattrs = {k: v for k, v in attrs.items() if k not in ("complete", "start", "stop", "shard_index")}
        shards.write_block(RunDir(run).chunk(name, a, rng.stop), chunk, {**cattrs, "chunk_start": a,
                           "chunk_stop": rng.stop}, attrs["dim"], "float32")


def test_kill_mid_finalize_leaves_a_state_that_resumes(reference: tuple[Path, Path], tmp_path: Path) -> None:
    """What a kill -9 during finalize leaves: all chunk files plus a torn shard temp file (shard 0); a complete
    shard whose chunk folder was not yet removed (shard 1); stale temp files. Nothing is extracted again."""
    lst, ref = reference
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    s0, s1 = "shard-00000-of-00002", "shard-00001-of-00002"
    split_into_chunks(out, s0)
    data = RunDir(out).shard(s0).read_bytes()
    RunDir(out).shard(s0).unlink()
    (out / "shards" / f"{s0}.h5.tmp-999999").write_bytes(data[: len(data) // 2])
    split_into_chunks(out, s1)
    (RunDir(out).parts(s1) / "chunk-000000000012-000000000014.h5.tmp-999998").write_bytes(b"torn")
    (out / "shards" / f"{s1}.progress.json.tmp-999997").write_text("{")
    (out / "locks").mkdir(exist_ok=True)
    for torn in ("manifest.json.tmp-999996", "summary.json.tmp-999995", "locks/node-0000.lock.tmp-999994"):
        (out / torn).write_text("{")
    cli(*run_args(lst, out), check=True)
    assert not list(out.rglob("*.tmp-*"))
    s = summary(out)
    assert (s["resumed_rows"], s["processed_rows"]) == (ROWS, 0)
    assert all(e["stages"].get("load_model", 0) == 0 for e in s["shards"])  # no model was loaded
    assert_same_output(out, ref)


def test_retry_failed_on_chunks_and_finished_shards(reference: tuple[Path, Path], tmp_path: Path) -> None:
    """Shard 0 unfinished, its chunk files recording rows 1, 4, 5 as failed; shard 1 finished, with row 13 failed
    (a mount was down) and row 20 failed (its file is missing). Then the mount is back and row 20's file appears,
    but is not an image: --retry-failed recovers rows 1, 4, 5, 13 and gives row 20 its new reason."""
    lst, ref = reference
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    split_into_chunks(out, "shard-00000-of-00002", fail_rows={1, 4, 5})
    RunDir(out).shard("shard-00000-of-00002").unlink()
    one = RunDir(out).shard("shard-00001-of-00002")
    block, attrs = shards.read_block(one), shards.read_attrs(one)
    keep = block.rows != 13
    shards.write_block(one, shards.Block(block.rows[keep], [n for n, k in zip(block.names, keep) if k],
                                         block.features[keep], np.r_[13, block.failed_rows],
                                         [block.names[1], *block.failed_names],
                                         ["error: OSError: [Errno 5] Input/output error", *block.failed_reasons]),
                       attrs, attrs["dim"], "float32")
    missing = lst.parent / "imgs" / "missing.jpg"
    missing.write_bytes(b"not an image yet")
    try:
        proc = cli(*run_args(lst, out, "--retry-failed"), check=True)
    finally:
        missing.unlink()
    s = summary(out)
    assert (s["retried_rows"], s["recovered_rows"], s["processed_rows"]) == (5, 4, 0), proc.stderr
    after = read_all(out)
    assert after["shard-00000-of-00002.h5"]["rows"].tolist() == list(range(12))
    assert after["shard-00001-of-00002.h5"]["rows"].tolist() == [r for r in range(12, 24) if r != 20]
    assert after["shard-00001-of-00002.h5"]["failed_rows"].tolist() == [20]
    assert after["shard-00001-of-00002.h5"]["failed_reasons"][0].decode().startswith("not_image: ")
    assert_same_output(out, ref, ignore=("failed_reasons",))  # row 20 failed in the clean run too (as missing)


@pytest.mark.parametrize("extra, differs", [
    (["--model", "resnet18"], "model: 'mobilenet_v2' -> 'resnet18'"),
    (["--seed", "1"], "weights: 'none:seed=0' -> 'none:seed=1'"),
    (["--layer", "features.18"], "layer: 'classifier.0' -> 'features.18'"),
    (["--pool", "gem"], "pool: 'avg' -> 'gem'"),
    (["--decode", "exact"], "'decode': 'fast'"),
    (["--dtype", "float16"], "dtype: 'float32' -> 'float16'"),
    (["--no-normalize"], "normalize: True -> False"),
    (["--input-changed"], "the input list changed"),
])
def test_config_change_is_refused_saying_what_differs(reference: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str], extra: list[str],
                                                      differs: str) -> None:
    lst, ref = reference
    before = (ref / "manifest.json").read_text()
    if extra == ["--input-changed"]:
        changed = lst.parent / f"changed-{os.getpid()}.txt"
        changed.write_text(lst.read_text() + "imgs/img000.jpg\n")
        args, extra = run_args(changed, ref), []
    else:
        args = run_args(lst, ref)
    code = main(args + extra)  # in-process: the refusal comes before any worker starts
    err = capsys.readouterr().err
    assert code == 2 and "holds a run with another config" in err and differs in err, err
    assert "--overwrite" in err and (ref / "manifest.json").read_text() == before

"""featshard's Python API: run -> merge -> search -> open_run from a script (main guard), `python -c` and a
Jupyter-style interpreter; typed results; errors raised, never exits; a script without a main guard fails clearly."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, make_images, write_list

import featshard
from featshard.runner.report import RunSummary

OPTIONS = dict(gpus="cpu:2", model="mobilenet_v2", weights="none", precision="fp32", graph="eager", batch_size=4,
               loader_workers=1)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("api")
    paths = make_images(root / "images", 8)
    return write_list(root / "list.txt", [f"images/{p.name}" for p in paths] + ["missing.jpg"]).parent


@pytest.fixture(scope="module")
def run(images: Path) -> Path:
    out = images / "run"
    summary = featshard.run(str(images / "list.txt"), str(out), **OPTIONS)  # type: ignore[arg-type]
    assert isinstance(summary, RunSummary)
    assert (summary.rows, summary.ok, summary.failed, summary.complete) == (9, 8, 1, True)
    return out


def test_merge_search_open_run(run: Path, images: Path) -> None:
    info = featshard.merge(str(run), index_spec="Flat")
    assert (info.ntotal, info.spec, info.recall, info.dim) == (8, "Flat", 1.0, 1280)
    hits = featshard.search(str(run), images=[str(images / "images" / "img003.png"), str(images / "nope.jpg")], k=3)
    assert hits[0].results[0].name == "images/img003.png" and hits[0].results[0].score >= 0.9999
    assert hits[0].results[0].row == 3 and hits[0].error is None
    assert hits[1].results == [] and hits[1].error is not None and hits[1].error.startswith("missing")
    opened = featshard.open_run(run)
    assert (opened.rows, opened.dim, opened.model, opened.complete) == (9, 1280, "mobilenet_v2", True)
    assert opened.names([8, 0, 3, 99]) == ["missing.jpg", "images/img000.jpg", "images/img003.png", None]
    batches = list(opened.iter_features(batch_rows=3))
    rows = np.concatenate([r for r, _, _ in batches])
    assert rows.tolist() == list(range(8)) and all(len(n) == len(f) for _, n, f in batches)
    assert [(f.row, f.name, f.reason.split(":")[0]) for f in opened.failures()] == [(8, "missing.jpg", "missing")]
    scores, ids = opened.index().search(batches[0][2][:1], 1)
    assert int(ids[0, 0]) == int(batches[0][0][0])


def test_verify_dedup_status(run: Path) -> None:
    featshard.merge(str(run))
    report = featshard.verify(str(run))
    assert report.ok, report.problems
    assert featshard.status(str(run))["totals"]["complete"] is True
    result = featshard.dedup(str(run), threshold=0.9999)
    assert result.metric == "ip" and isinstance(result.near, list)


def test_errors_are_raised_not_exits(tmp_path: Path, images: Path) -> None:
    with pytest.raises(featshard.UsageError, match="--batch-size 0"):
        featshard.run("list.txt", str(tmp_path / "r"), batch_size=0)
    with pytest.raises(featshard.UsageError, match="--pool 'median'"):
        featshard.run("list.txt", str(tmp_path / "r"), pool="median")
    with pytest.raises(featshard.UsageError, match="must be int"):
        featshard.run("list.txt", str(tmp_path / "r"), chunk_size="64")  # type: ignore[arg-type]
    with pytest.raises(featshard.UsageError, match="does not exist"):
        featshard.run(str(tmp_path / "nope.txt"), str(tmp_path / "r"), **OPTIONS)  # type: ignore[arg-type]
    with pytest.raises(featshard.FeatshardError, match="not a featshard run"):
        featshard.merge(str(tmp_path))
    with pytest.raises(TypeError):
        featshard.run("list.txt", str(tmp_path / "r"), no_such_option=1)  # type: ignore[call-arg]


def test_dry_run_and_with_config(images: Path, tmp_path: Path) -> None:
    config = featshard.RunConfig(str(images / "list.txt"), str(tmp_path / "r"), gpus="cpu:3", dry_run=True)
    plan = featshard.run.with_config(config)
    assert plan.dry_run and plan.rows == 9 and [s["stop"] - s["start"] for s in plan.plan] == [3, 3, 3]
    assert not (tmp_path / "r").exists()


CALL = """
import featshard
summary = featshard.run({lst!r}, {out!r}, gpus="cpu:2", model="mobilenet_v2", weights="none", precision="fp32",
                        graph="eager", batch_size=4, loader_workers=0)
print("RESULT", summary.ok, summary.failed, summary.complete)
"""


def _python(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=str(REPO),
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, **kw)  # type: ignore[call-overload]


@pytest.mark.slow
@pytest.mark.parametrize("caller", ["script", "python -c", "interactive"])
def test_run_from_every_kind_of_caller(caller: str, images: Path, tmp_path: Path) -> None:
    """The spawn pool re-imports the caller's __main__: a guarded script, `python -c` and an interactive
    interpreter (what Jupyter is: a __main__ without a file) all work."""
    code = CALL.format(lst=str(images / "list.txt"), out=str(tmp_path / "run"))
    if caller == "script":
        script = tmp_path / "job.py"
        script.write_text("if __name__ == '__main__':\n" + textwrap.indent(code, "    "))
        proc = _python([str(script)])
    elif caller == "python -c":
        proc = _python(["-c", code])
    else:
        console = f"import code\ncode.InteractiveConsole().runsource({code!r}, symbol='exec')\n"
        proc = _python(["-c", console])
    assert "RESULT 8 1 True" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_script_without_main_guard_fails_clearly(images: Path, tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(CALL.format(lst=str(images / "list.txt"), out=str(tmp_path / "run")))
    proc = _python([str(script)])
    assert proc.returncode != 0 and "RESULT" not in proc.stdout
    assert "__name__" in proc.stderr and "__main__" in proc.stderr, proc.stderr[-3000:]

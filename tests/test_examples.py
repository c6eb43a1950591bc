"""The scripts in examples/ run as a user would run them, on a tiny set (two demo photos and their variants)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from featshard.tools import demo

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("examples-set")
    demo.build_demo_set(out, limit=2)
    return out / "list.txt"


@pytest.fixture(scope="module")
def list_run(tiny_set: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    run = tmp_path_factory.mktemp("examples-run") / "run"
    env = dict(os.environ, FEATSHARD=f"{sys.executable} -m featshard", MODEL="mobilenet_v2",
               WEIGHTS=str(demo.weights_file()), GPUS="cpu")
    query = tiny_set.parent / "images" / "coffee__crop.jpg"
    proc = subprocess.run(["bash", str(EXAMPLES / "list_file_run.sh"), str(tiny_set), str(run), str(query)],
                          env=env, capture_output=True, text=True, timeout=300)
    return run, proc


def _ranked(stdout: str) -> list[str]:
    """Names of the ranked result lines of `featshard search` (rank, score, row, name)."""
    return [line.split()[-1] for line in stdout.splitlines() if line[:1] == " " and line.strip()[:1].isdigit()]


def test_list_file_run(list_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    run, proc = list_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "index" / "index.faiss").is_file()
    assert f"verify {run}: OK: 10 rows: 10 with a feature, 0 failed" in proc.stdout
    ranked = _ranked(proc.stdout)
    assert ranked[0] == "images/coffee__crop.jpg"
    assert all(Path(name).name.startswith("coffee") for name in ranked[:5]), proc.stdout


def test_read_outputs_with_plain_h5py_and_faiss(list_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    run, proc = list_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = subprocess.run([sys.executable, str(EXAMPLES / "read_outputs.py"), str(run), "-k", "3"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "10 vectors of dim 1280" in out
    assert "nearest to images/chelsea.png:" in out
    assert "1. images/chelsea.png  row 0  score 1.0000" in out
    assert "2. images/chelsea__" in out


def test_finetuned_checkpoint_run(tiny_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "finetuned_checkpoint.py"), "--input", str(tiny_set), "--out", str(out),
         "--model", "mobilenet_v2", "--base-weights", str(demo.weights_file()), "--classes", "3", "--steps", "2",
         "--gpus", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "mobilenet_v2-finetuned.pt"
    assert "step 2/2: loss" in proc.stdout
    manifest = json.loads((out / "run" / "manifest.json").read_text())
    assert manifest["model"]["weights"] == str(ckpt)
    assert manifest["model"]["weights_hash"] == "sha256:" + hashlib.sha256(ckpt.read_bytes()).hexdigest()
    shard = next((out / "run" / "shards").glob("shard-*.h5"))
    with h5py.File(shard, "r") as f:
        assert f.attrs["complete"] and f["features"].shape == (10, 1280)
    assert _ranked(proc.stdout)[0] == "images/chelsea.png"

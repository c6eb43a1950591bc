"""Bad input reaches the user as a clear message and a non-zero status; a killed worker never hangs `run`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import FAST, REPO, cli, make_images, write_list

from featshard.cli import main


@pytest.fixture()
def small_list(tmp_path: Path) -> Path:
    return write_list(tmp_path / "list.txt", make_images(tmp_path / "imgs", 2))


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def test_missing_input_option(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run_main(capsys, "run", "--out", str(tmp_path / "o"))
    assert code == 2 and "--input" in err


def test_nonexistent_and_empty_list(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run_main(capsys, "run", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"))
    assert code == 2 and "does not exist" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    code, err = run_main(capsys, "run", "--input", str(empty), "--out", str(tmp_path / "o"), "--gpus", "cpu")
    assert code == 2 and "lists no images" in err


@pytest.mark.parametrize("extra, message", [
    (["--model", "resnet5000"], "unknown model 'resnet5000'"),
    (["--model", "resnet18", "--layer", "layer9"], "unknown --layer 'layer9'"),
    (["--gpus", "0-63"], "not visible"),  # invalid on a GPU node too
    (["--gpus", "cpu:zero"], "cpu:N needs a worker count"),
])
def test_bad_model_layer_devices(capsys: pytest.CaptureFixture[str], small_list: Path, tmp_path: Path,
                                 extra: list[str], message: str) -> None:
    code, err = run_main(capsys, "run", "--input", str(small_list), "--out", str(tmp_path / "o"),
                         "--weights", "none", *extra)
    assert code == 2 and message in err, err


def test_unreadable_weights_file(capsys: pytest.CaptureFixture[str], small_list: Path, tmp_path: Path) -> None:
    junk = tmp_path / "w.pth"
    junk.write_bytes(b"this is not a checkpoint")
    base = ["run", "--input", str(small_list), "--out", str(tmp_path / "o"), "--model", "resnet18", "--gpus", "cpu"]
    code, err = run_main(capsys, *base, "--weights", str(junk))
    assert code == 2 and "not a readable PyTorch checkpoint" in err
    code, err = run_main(capsys, *base, "--weights", str(tmp_path / "missing.pth"))
    assert code == 2 and "no such file" in err


def test_default_weights_offline_says_what_to_do(capsys: pytest.CaptureFixture[str], small_list: Path,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # make sure nothing is fetched, even with a network
    code, err = run_main(capsys, "run", "--input", str(small_list), "--out", str(tmp_path / "o"),
                         "--model", "resnet18", "--gpus", "cpu")
    assert code == 1 and "--weights PATH" in err


def test_out_dir_that_is_a_file(capsys: pytest.CaptureFixture[str], small_list: Path, tmp_path: Path) -> None:
    out = tmp_path / "file"
    out.write_text("x")
    code, err = run_main(capsys, "run", "--input", str(small_list), "--out", str(out), "--weights", "none")
    assert code == 2 and "not a directory" in err


@pytest.mark.slow
def test_changed_config_is_refused_then_overwrite(small_list: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cli("run", "--input", str(small_list), "--out", str(out), "--gpus", "cpu", "--weights", "none", *FAST, check=True)
    proc = cli("run", "--input", str(small_list), "--out", str(out), "--gpus", "cpu", "--weights", "none",
               *FAST, "--pool", "max")
    assert proc.returncode == 2 and "pool: 'avg' -> 'max'" in proc.stderr
    cli("run", "--input", str(small_list), "--out", str(out), "--gpus", "cpu", "--weights", "none", *FAST,
        "--pool", "max", "--overwrite", check=True)


def _wait_running(out: Path, deadline: float) -> dict:
    while time.monotonic() < deadline:
        for path in sorted((out / "shards").glob("*.progress.json")):
            try:
                prog = json.loads(path.read_text())
            except ValueError:
                continue
            if prog.get("state") == "running" and prog.get("rows_done", 0) > 0:
                return prog
        time.sleep(0.2)
    raise AssertionError("no shard started running")


@pytest.mark.slow
@pytest.mark.parametrize("retries", [0, 1])
def test_sigkilled_worker_never_hangs_run(tmp_path: Path, retries: int) -> None:
    lst = write_list(tmp_path / "list.txt", make_images(tmp_path / "imgs", 5) * 12)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "featshard", "run", "--input", str(lst), "--out", str(out), "--gpus", "cpu:2",
           "--weights", "none", "--chunk-size", "4", "--max-retries", str(retries), *FAST, "--batch-size", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stderr=subprocess.PIPE,
                            text=True)
    victim = _wait_running(out, time.monotonic() + 120)
    os.kill(victim["pid"], signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    if retries == 0:
        assert proc.returncode != 0
        assert victim["shard"] in err and "died" in err
    else:
        assert proc.returncode == 0, err
        assert "retry 1/1" in err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["ok"] == 60 and summary["complete"]

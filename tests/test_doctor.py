"""`featshard doctor`: the facts of this machine, and each problem with what to do about it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import cli

from featshard.runner.doctor import diagnose, installed_faiss


def facts(**over: Any) -> dict[str, Any]:
    base = {"driver_loaded": False, "driver_version": None, "torch": "2.14.1+cu130", "torch_cuda": "13.0",
            "torch_gpus": 0, "cuda_warning": None, "faiss_installed": {"faiss-cpu": "1.15.1"}, "faiss": "1.15.1",
            "faiss_gpu_build": False, "faiss_gpus": 0}
    return {**base, **over}


def test_doctor_reports_this_machine() -> None:
    import faiss
    import torch

    proc = cli("doctor", "--json")
    report = json.loads(proc.stdout)
    f = report["facts"]
    assert f["torch"] == torch.__version__ and f["torch_cuda"] == torch.version.cuda and f["faiss"] == faiss.__version__
    assert f["torch_gpus"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert f["faiss_gpus_match_torch"] == (f["faiss_gpus"] == f["torch_gpus"])
    assert f["faiss_installed"] == installed_faiss() and f["cpus_usable"] >= 1 and f["shm_free_mib"] > 0
    assert proc.returncode == (0 if report["ok"] else 1) and report["ok"] == (not report["problems"])
    text = cli("doctor").stdout
    assert "faiss_gpus_match_torch" in text and text.rstrip().endswith("ok" if report["ok"] else "problem(s)")


def test_a_cpu_machine_with_faiss_cpu_is_fine() -> None:
    assert diagnose(facts()) == []


def test_two_faiss_builds_and_a_cpu_faiss_on_a_gpu_node_are_problems() -> None:
    both = diagnose(facts(faiss_installed={"faiss-cpu": "1.15.1", "faiss-gpu": "1.15.1"}))
    assert len(both) == 1 and "several faiss builds" in both[0] and "GPU=1" in both[0]
    gpu_node = diagnose(facts(driver_loaded=True, torch_gpus=8))
    assert len(gpu_node) == 1 and "faiss sees 0 GPU(s), torch sees 8" in gpu_node[0] and "GPU=1" in gpu_node[0]
    assert diagnose(facts(driver_loaded=True, torch_gpus=8, faiss_gpu_build=True, faiss_gpus=8)) == []


def test_driver_without_torch_gpus_is_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    (tmp_path / "nvidiactl").write_text("")
    found = diagnose(facts(driver_loaded=True, driver_version="535.104.05",
                           cuda_warning="CUDA initialization: The NVIDIA driver on your system is too old"),
                     roots=(str(tmp_path / "nvidiactl"),))
    assert len(found) == 1 and "535.104.05" in found[0] and "too old" in found[0] and "580 or newer" in found[0]

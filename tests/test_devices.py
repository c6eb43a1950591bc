from __future__ import annotations

import os
from pathlib import Path

import pytest

from featshard.errors import UsageError
from featshard.runner import gpuprobe
from featshard.runner.devices import (Device, capabilities, device_identity, nvidia_driver_present, parse_gpus,
                                      physical_id, pin_device, visible_cuda_count)


@pytest.mark.parametrize("spec, visible, expected", [
    ("0-7", 8, [f"cuda:{i}" for i in range(8)]),
    ("0,2,5", 8, ["cuda:0", "cuda:2", "cuda:5"]),
    ("1-3,6", 8, ["cuda:1", "cuda:2", "cuda:3", "cuda:6"]),
    ("all", 3, ["cuda:0", "cuda:1", "cuda:2"]),
    ("cpu", 4, ["cpu:0"]),
    ("cpu:3", 0, ["cpu:0", "cpu:1", "cpu:2"]),
    (" CPU:2 ", 0, ["cpu:0", "cpu:1"]),
    (None, 2, ["cuda:0", "cuda:1"]),
    (None, 0, ["cpu:0"]),
    ("3", 4, ["cuda:3"]),
])
def test_parse_gpus(spec, visible, expected):
    assert [str(d) for d in parse_gpus(spec, visible=visible)] == expected


@pytest.mark.parametrize("spec, visible, message", [
    ("0-8", 8, "GPU [8] not visible; visible GPUs: 0-7"),
    ("0", 0, "no CUDA device is visible"),
    ("all", 0, "no CUDA device is visible"),
    ("cpu:0", 0, "cpu:N needs a worker count"),
    ("cpu:x", 0, "cpu:N needs a worker count"),
    ("3-1", 8, "runs backwards"),
    ("a,b", 8, "expected e.g."),
    ("0,0", 8, "listed twice"),
    ("1--2", 8, "expected e.g."),
    ("", 0, None),
])
def test_parse_gpus_errors(spec, visible, message):
    if message is None:
        assert [str(d) for d in parse_gpus(spec, visible=visible)] == ["cpu:0"]
        return
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_gpus(spec, visible=visible)


def test_physical_id_follows_cuda_visible_devices():
    assert physical_id(1, None) == "1"
    assert physical_id(1, "4,5,6") == "5"
    assert physical_id(0, "GPU-abc,GPU-def") == "GPU-abc"
    with pytest.raises(UsageError):
        physical_id(3, "4,5")


def test_device_parse_roundtrip():
    assert Device.parse("cuda:3") == Device("cuda", 3)
    assert str(Device.parse("cpu:0")) == "cpu:0"
    with pytest.raises(UsageError):
        Device.parse("tpu:1")


def test_pin_device_sets_env(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert pin_device(Device("cuda", 2)) == "cuda:0"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"
    assert pin_device(Device("cpu", 0), cpu_threads=1) == "cpu"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_no_nvidia_driver_means_no_gpu_without_importing_torch(tmp_path, monkeypatch) -> None:
    import subprocess
    import sys

    from featshard.runner.devices import nvidia_driver_present

    assert not nvidia_driver_present((str(tmp_path / "nope"),))
    assert nvidia_driver_present((str(tmp_path),))
    if nvidia_driver_present():
        return  # a GPU machine: the count needs torch there
    code = ("import sys; from featshard.runner.devices import parse_gpus; "
            "print(parse_gpus(None), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[Device(kind='cpu', index=0)] False"


def fake_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str = "535.104.05") -> tuple[str, ...]:
    """A node whose driver is loaded (a control-device stand-in passed as the driver root, an `nvidia-smi` on PATH
    that answers like the real one) while torch sees no GPU: torch really sees none here; on a GPU machine a
    CUDA_VISIBLE_DEVICES naming no real device makes torch see none as well."""
    (tmp_path / "bin").mkdir()
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho {version}\n")
    smi.chmod(0o755)
    (tmp_path / "nvidiactl").write_text("")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    if nvidia_driver_present():
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-00000000-0000-0000-0000-000000000000")
    return (str(tmp_path / "nvidiactl"),)


def test_driver_present_but_torch_sees_no_gpu_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    roots = fake_driver(tmp_path, monkeypatch)
    with pytest.raises(UsageError) as err:
        visible_cuda_count(roots)
    text = str(err.value)
    assert "535.104.05" in text and f"torch {torch.__version__}" in text and "--gpus cpu" in text
    assert f"built for CUDA {torch.version.cuda}" in text
    if torch.version.cuda and torch.version.cuda.startswith("13"):
        assert "580 or newer" in text
    assert gpuprobe.driver_version(roots) == "535.104.05"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hidden on purpose: the CPU it is
    assert visible_cuda_count(roots) == 0 and parse_gpus("cpu:2") == [Device("cpu", 0), Device("cpu", 1)]


def test_driver_version_from_proc_without_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "nvidia"
    root.mkdir()
    (root / "version").write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build"
                                  "  (dvs-builder@U16-I3-C09-3-4)  Sun Jul 27 07:09:26 UTC 2025\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpuprobe.driver_version((str(root),)) == "580.65.06"


def test_the_probe_asks_torch_in_a_subprocess_and_leaves_this_process_alone() -> None:
    import sys

    view = gpuprobe.probe()
    import torch

    assert view.probed and view.torch == torch.__version__ and view.cuda == torch.version.cuda
    assert view.count == len(view.devices) and all(d.uuid.startswith(("GPU-", "MIG-")) for d in view.devices)
    assert "torch" in sys.modules and not torch.cuda.is_initialized()


def test_capabilities_of_the_selected_devices() -> None:
    view = gpuprobe.CudaView(3, tuple(gpuprobe.GpuInfo(f"G{i}", cap, f"GPU-{i}", 1) for i, cap in
                                      enumerate([(9, 0), (7, 5), (8, 6)])), "2.x", "13.0", None, True)
    assert capabilities([Device("cuda", 0), Device("cuda", 2)], view) == [(9, 0), (8, 6)]
    assert capabilities([Device("cpu", 0)], view) == []


def test_inline_backend_refuses_what_it_would_run_on_gpu_0() -> None:
    from featshard.runner.backends import check_backend

    check_backend("inline", [Device("cuda", 0)])
    check_backend("inline", [Device("cpu", 0), Device("cpu", 1)])
    check_backend("pool", [Device("cuda", 0), Device("cuda", 3)])
    for devices in ([Device("cuda", 1)], [Device("cuda", 0), Device("cuda", 1)]):
        with pytest.raises(UsageError, match="one GPU only"):
            check_backend("inline", devices)


def test_device_identity_is_empty_on_cpu() -> None:
    assert device_identity("cpu") == {}


@pytest.mark.gpu
def test_identity_and_capability_as_torch_sees_them() -> None:
    import subprocess
    import sys

    import torch

    view = gpuprobe.probe()
    assert view.count == torch.cuda.device_count()
    smi = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True, text=True,
                         check=True).stdout.split()
    for i, gpu in enumerate(view.devices):
        assert gpu.capability == torch.cuda.get_device_capability(i) and gpu.uuid in smi
    code = ("import sys; from featshard.runner.devices import parse_gpus, capabilities; d = parse_gpus(None); "
            "capabilities(d); t = sys.modules.get('torch'); print(len(d), t is not None and t.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split() == [str(view.count), "False"]  # counted and probed, CUDA never started here

from __future__ import annotations

import os

import pytest

from featshard.runner.devices import Device, parse_gpus, physical_id, pin_device
from featshard.errors import UsageError


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

"""Device specs (`--gpus`), the visible-device map, and pinning a worker to its device before CUDA starts."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from featshard.errors import UsageError
from featshard.runner.gpuprobe import (DRIVER_ROOTS, CudaView, check_driver_seen, cuda_view, driver_present,
                                       nvidia_uuid)

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


@dataclass(frozen=True)
class Device:
    """One worker's device: kind 'cuda' (index = position among the coordinator's visible GPUs) or 'cpu'."""

    kind: str
    index: int

    def __str__(self) -> str:
        return f"{self.kind}:{self.index}"

    @classmethod
    def parse(cls, text: str) -> "Device":
        kind, _, idx = text.partition(":")
        if kind not in ("cuda", "cpu") or not idx.isdigit():
            raise UsageError(f"bad device {text!r}: expected cuda:N or cpu:N")
        return cls(kind, int(idx))


def visible_cuda_count(roots: tuple[str, ...] = DRIVER_ROOTS) -> int:
    """Number of CUDA devices torch can use in this process (0 without a driver), asked without initialising CUDA
    here (see featshard.runner.gpuprobe). Refuses (UsageError) when a driver is loaded but torch sees no GPU."""
    view = cuda_view(roots)
    check_driver_seen(view, roots)
    return view.count


def nvidia_driver_present(roots: tuple[str, ...] = DRIVER_ROOTS) -> bool:
    """Whether an NVIDIA driver is loaded here: without one there is no CUDA device, and answering that costs no
    `import torch` (~2.5 s on the 2-core box, before the workers can even be started)."""
    return driver_present(roots)


def parse_gpus(spec: str | None, visible: int | None = None) -> list[Device]:
    """Turn a `--gpus` spec into devices: '0-7', '0,2,5', '1-3,6', 'all', 'cpu', 'cpu:N'; None means the default
    (all GPUs torch can use; the CPU where there is no driver; refused where a driver is loaded but torch sees no GPU
    and CUDA_VISIBLE_DEVICES does not hide them on purpose). `visible` overrides the GPU count (tests, SLURM probes)."""
    spec = (spec or "").strip().lower()
    n_visible = 0
    if spec != "cpu" and not spec.startswith("cpu:"):  # only GPU specs ask torch (in a subprocess: see gpuprobe)
        n_visible = visible_cuda_count() if visible is None else visible
        spec = spec or ("all" if n_visible > 0 else "cpu")
    if spec == "cpu":
        return [Device("cpu", 0)]
    if spec.startswith("cpu:"):
        count = spec[4:]
        if not count.isdigit() or int(count) < 1:
            raise UsageError(f"bad --gpus {spec!r}: cpu:N needs a worker count N >= 1")
        return [Device("cpu", i) for i in range(int(count))]
    if spec == "all":
        if n_visible == 0:
            raise UsageError("--gpus all: no CUDA device is visible; use --gpus cpu or cpu:N")
        return [Device("cuda", i) for i in range(n_visible)]
    return [Device("cuda", i) for i in _parse_index_list(spec, n_visible)]


def capabilities(devices: list[Device], view: CudaView | None = None) -> list[tuple[int, int]]:
    """The compute capability of each selected GPU, as torch reports it (empty for CPU devices)."""
    cuda = [d for d in devices if d.kind == "cuda"]
    if not cuda:
        return []
    view = cuda_view() if view is None else view
    return [view.devices[d.index].capability for d in cuda if d.index < len(view.devices)]


def device_identity(device: str) -> dict[str, str]:
    """Name and UUID (as nvidia-smi prints it) of the CUDA device this worker was pinned to (`cuda:0` after
    `pin_device`); {} for the CPU. Initialises CUDA in this process: call it in a worker, never in the coordinator."""
    if not device.startswith("cuda"):
        return {}
    import torch

    props = torch.cuda.get_device_properties(torch.device(device))
    return {"device_name": props.name, "device_uuid": nvidia_uuid(getattr(props, "uuid", "")),
            "device_capability": f"{props.major}.{props.minor}",
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def _parse_index_list(spec: str, n_visible: int) -> list[int]:
    indices: list[int] = []
    for part in spec.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise UsageError(f"bad --gpus {spec!r}: expected e.g. 0-7, 0,2,5, 1-3,6, all, cpu or cpu:N")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise UsageError(f"bad --gpus {spec!r}: range {part} runs backwards")
        indices.extend(range(lo, hi + 1))
    if len(set(indices)) != len(indices):
        raise UsageError(f"bad --gpus {spec!r}: a device is listed twice")
    missing = [i for i in indices if i >= n_visible]
    if missing:
        raise UsageError(f"--gpus {spec!r}: GPU {missing} not visible; {describe_visible(n_visible)}")
    return indices


def describe_visible(n_visible: int) -> str:
    if n_visible == 0:
        return "no CUDA device is visible (use --gpus cpu or cpu:N)"
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    extra = f" (CUDA_VISIBLE_DEVICES={env})" if env is not None else ""
    return f"visible GPUs: 0-{n_visible - 1}{extra}"


def physical_id(index: int, env_value: str | None) -> str:
    """Map a logical GPU index (as the coordinator sees it) to the id to put in the worker's CUDA_VISIBLE_DEVICES."""
    if env_value is None or env_value.strip() == "":
        return str(index)
    ids = [x.strip() for x in env_value.split(",") if x.strip()]
    if index >= len(ids):
        raise UsageError(f"GPU {index} is not among CUDA_VISIBLE_DEVICES={env_value}")
    return ids[index]


def pin_device(device: Device, cpu_threads: int | None = None) -> str:
    """Pin this process to `device` and return the torch device string to use inside it.

    Must run before anything touches CUDA in this process: for a GPU it narrows CUDA_VISIBLE_DEVICES to the one
    physical id, so the worker sees exactly one device, `cuda:0`. For a CPU worker it hides GPUs and sets the
    number of intra-op threads.
    """
    if device.kind == "cuda":
        _refuse_if_cuda_started()
        os.environ["CUDA_VISIBLE_DEVICES"] = physical_id(device.index, os.environ.get("CUDA_VISIBLE_DEVICES"))
        target = "cuda:0"
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        target = "cpu"
    if cpu_threads:
        import torch

        torch.set_num_threads(max(1, cpu_threads))
    return target


def _refuse_if_cuda_started() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("pin_device called after CUDA was initialised in this process; pin first")

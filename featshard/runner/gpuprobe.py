"""What this node's GPUs look like to torch, learned without initialising CUDA (or importing torch) in this process.

The coordinator must not initialise CUDA: its workers pin their device through CUDA_VISIBLE_DEVICES, which CUDA reads
once, and a CUDA context in the coordinator costs memory on a GPU. NVML-based counting
(`PYTORCH_NVML_BASED_CUDA_CHECK=1`) avoids that but answers for the driver, not for torch: on a node whose driver is
too old for torch's CUDA it counts 8 GPUs that no worker can use. So `cuda_view()` asks torch itself, in a
short-lived subprocess (about as long as an `import torch`, once per command), with the coordinator's
CUDA_VISIBLE_DEVICES: the same enumeration its workers get, each device's compute capability (the precision
choice), name and UUID, and torch's own message when CUDA cannot start. Where no NVIDIA driver is loaded nothing is
started at all: there is no GPU to see.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from featshard.errors import FeatshardError, UsageError

log = logging.getLogger("featshard.runner.gpuprobe")
DRIVER_ROOTS = ("/proc/driver/nvidia", "/dev/nvidiactl")
PROBE_TIMEOUT = 180.0  # s: cuInit on a node of 8 GPUs without persistence mode can take tens of seconds
MIN_DRIVER = {13: "580", 12: "525", 11: "450"}  # CUDA major -> oldest Linux driver it runs on (minor compatibility)

_PROBE = r"""
import json, warnings
out = {"torch": None, "cuda": None, "count": 0, "devices": [], "error": None}
try:
    import torch
    out["torch"], out["cuda"] = torch.__version__, torch.version.cuda
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["count"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out["error"] = "; ".join(str(w.message) for w in caught if "CUDA" in str(w.message)) or None
    for i in range(out["count"]):
        p = torch.cuda.get_device_properties(i)
        out["devices"].append({"name": p.name, "capability": [p.major, p.minor], "memory": p.total_memory,
                               "uuid": str(getattr(p, "uuid", ""))})
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    capability: tuple[int, int]
    uuid: str  # as nvidia-smi prints it: GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx
    memory: int  # bytes


@dataclass(frozen=True)
class CudaView:
    """torch's view of the visible GPUs (`probed` False: not asked, because no driver is loaded or
    CUDA_VISIBLE_DEVICES is deliberately empty)."""

    count: int = 0
    devices: tuple[GpuInfo, ...] = ()
    torch: str | None = None
    cuda: str | None = None  # the CUDA version torch was built for (torch.version.cuda)
    error: str | None = None  # torch's words when CUDA could not start (e.g. "driver ... too old")
    probed: bool = False


_views: dict[tuple[str | None, tuple[str, ...]], CudaView] = {}


def driver_present(roots: tuple[str, ...] = DRIVER_ROOTS) -> bool:
    """Whether an NVIDIA driver is loaded here (its /proc entry or control device exists)."""
    return any(os.path.exists(root) for root in roots)


def deliberately_hidden(env: str | None = None) -> bool:
    """CUDA_VISIBLE_DEVICES set to nothing (or -1): the user hid the GPUs on purpose."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES") if env is None else env
    return value is not None and value.strip() in ("", "-1")


def cuda_view(roots: tuple[str, ...] = DRIVER_ROOTS) -> CudaView:
    """torch's view of the GPUs visible to this process (asked once per CUDA_VISIBLE_DEVICES value)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if deliberately_hidden(visible) or not driver_present(roots):
        return CudaView()
    key = (visible, roots)
    if key not in _views:
        _views[key] = probe()
    return _views[key]


def probe() -> CudaView:
    """Run the probe: a fresh interpreter imports torch and asks CUDA (PYTORCH_NVML_BASED_CUDA_CHECK removed, so it
    asks the CUDA runtime, which fails where the driver is too old, instead of NVML, which does not)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env,
                              timeout=PROBE_TIMEOUT)
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        raise FeatshardError(f"asking torch for the GPUs took over {PROBE_TIMEOUT:.0f} s (a hung driver?); "
                             "nvidia-smi should answer at once") from None
    except (OSError, ValueError, IndexError) as exc:
        raise FeatshardError(f"could not ask torch for the GPUs: {exc}") from None
    devices = tuple(GpuInfo(d["name"], (int(d["capability"][0]), int(d["capability"][1])), nvidia_uuid(d["uuid"]),
                            int(d["memory"])) for d in data["devices"])
    view = CudaView(int(data["count"]), devices, data["torch"], data["cuda"], data["error"], True)
    log.debug("torch %s (CUDA %s) sees %d GPU(s): %s", view.torch, view.cuda, view.count,
              ", ".join(f"{d.name} sm_{d.capability[0]}{d.capability[1]}" for d in devices) or view.error)
    return view


def nvidia_uuid(text: str) -> str:
    """A device UUID as nvidia-smi prints it (torch's `get_device_properties(i).uuid` has no `GPU-` prefix)."""
    text = str(text)
    return text if not text or text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def driver_version(roots: tuple[str, ...] = DRIVER_ROOTS) -> str | None:
    """The loaded driver's version: nvidia-smi's answer, else the kernel module's /proc entry; None when unknown."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
        lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
        if out.returncode == 0 and lines:
            return lines[0]
    except (OSError, subprocess.SubprocessError):
        pass
    for root in roots:
        try:
            text = (Path(root) / "version").read_text(encoding="utf-8")
        except OSError:
            continue
        match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", text)
        if match:
            return match.group(1)
    return None


def check_driver_seen(view: CudaView, roots: tuple[str, ...] = DRIVER_ROOTS) -> None:
    """Refuse to fall back to the CPU when a driver is loaded but torch counts no GPU: that is a torch build too
    new for the driver (or a broken install), and a silent CPU run on a GPU node costs hours."""
    if view.count > 0 or deliberately_hidden() or not driver_present(roots):
        return
    raise UsageError(no_gpu_message(view, driver_version(roots), roots))


def no_gpu_message(view: CudaView, driver: str | None, roots: tuple[str, ...] = DRIVER_ROOTS) -> str:
    found = [r for r in roots if os.path.exists(r)]
    major = int(view.cuda.split(".")[0]) if view.cuda and view.cuda.split(".")[0].isdigit() else None
    need = MIN_DRIVER.get(major or -1)
    what = (f"update the NVIDIA driver to {need} or newer (torch's CUDA {view.cuda} needs it), or install a torch "
            "build for the CUDA version your driver supports (nvidia-smi prints it top right; PyTorch publishes cu12x "
            "builds of each release)") if need else "install a torch build with CUDA support for this driver"
    said = f" torch says: {view.error}." if view.error else ""
    return (f"an NVIDIA driver is loaded ({driver or 'version unknown'}; {', '.join(found)}) but torch "
            f"{view.torch or '?'} (built for CUDA {view.cuda or 'none'}) sees no GPU.{said} To use the GPUs: {what}. "
            "To run on the CPU on purpose: --gpus cpu (or cpu:N), or CUDA_VISIBLE_DEVICES=''.")

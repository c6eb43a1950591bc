"""`featshard doctor`: what this machine offers a run, and what would go wrong on it: torch and its CUDA, the driver,
the GPUs torch sees, faiss's build and the GPUs it sees (they must be the same), the faiss packages installed (the
CPU and GPU builds both own `faiss/`: exactly one may be installed), CPUs and /dev/shm.

Unlike `run`, it asks torch in this process (initialising CUDA is what it is for here)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

from featshard import __version__
from featshard.runner.gpuprobe import (DRIVER_ROOTS, deliberately_hidden, driver_present, driver_version,
                                       no_gpu_message, nvidia_uuid)
from featshard.system import cpu_budget

FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu-cu12-cuvs",
                       "faiss-gpu-cu13-cuvs", "faiss-gpu-cuvs", "faiss-cuda", "faiss")


@dataclass
class DoctorReport:
    """The facts (`facts`), and what is wrong (`problems`, each with what to do); `ok` when nothing is."""

    facts: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def faiss_gpu_build() -> bool:
    """Whether the faiss installed here is a GPU build (it has GPU resources, whether or not a GPU is visible)."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources")


def installed_faiss() -> dict[str, str]:
    """faiss distributions installed in this environment, with their versions."""
    found = {}
    for name in FAISS_DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def torch_facts() -> dict[str, Any]:
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    gpus = []
    for i in range(torch.cuda.device_count() if available else 0):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib":
                     round(p.total_memory / 2**30, 1), "uuid": nvidia_uuid(getattr(p, "uuid", "")),
                     "bf16": (p.major, p.minor) >= (8, 0)})
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": available,
            "torch_gpus": len(gpus), "gpus": gpus,
            "cuda_warning": "; ".join(str(w.message) for w in caught if "CUDA" in str(w.message)) or None}


def faiss_facts() -> dict[str, Any]:
    try:
        import faiss
    except ImportError as exc:
        return {"faiss": None, "faiss_error": str(exc)}
    gpu_build = hasattr(faiss, "StandardGpuResources")
    return {"faiss": faiss.__version__, "faiss_gpu_build": gpu_build,
            "faiss_gpus": int(faiss.get_num_gpus()) if gpu_build else 0}


def machine_facts(roots: tuple[str, ...] = DRIVER_ROOTS) -> dict[str, Any]:
    from featshard.extract.loader import SHM_PATH, loader_split, shm_free

    budget = cpu_budget()
    present = driver_present(roots)
    return {"featshard": __version__, "python": platform.python_version(), "driver_loaded": present,
            "driver_version": driver_version(roots) if present else None,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cpus_affinity": budget.affinity, "cpu_quota": budget.quota, "cpus_usable": budget.usable,
            "shm_free_mib": round(shm_free(SHM_PATH) / 2**20, 1), "loaders_one_device": loader_split(1)[0],
            "faiss_installed": installed_faiss()}


def diagnose(facts: dict[str, Any], roots: tuple[str, ...] = DRIVER_ROOTS) -> list[str]:
    """What is wrong in `facts`, each with what to do."""
    problems = []
    if facts["driver_loaded"] and facts["torch_gpus"] == 0 and not deliberately_hidden():
        from featshard.runner.gpuprobe import CudaView

        view = CudaView(0, (), facts["torch"], facts["torch_cuda"], facts.get("cuda_warning"), True)
        problems.append(no_gpu_message(view, facts["driver_version"], roots))
    builds = facts["faiss_installed"]
    if len(builds) > 1:
        problems.append(f"several faiss builds are installed ({', '.join(f'{k} {v}' for k, v in builds.items())}); "
                        "they all own the `faiss` package, so the last one installed wins: keep one (make install "
                        "or make install GPU=1 removes the other)")
    if facts.get("faiss") is None:
        problems.append(f"faiss cannot be imported ({facts.get('faiss_error')}): make install (or GPU=1)")
    elif facts["faiss_gpus"] != facts["torch_gpus"]:
        hint = ("faiss is a CPU build: `make install GPU=1` installs the GPU build" if not facts["faiss_gpu_build"]
                else "the GPU build of faiss sees other GPUs than torch: check its CUDA runtime against the driver")
        if facts["faiss_gpu_build"] or facts["torch_gpus"] > 0:
            problems.append(f"faiss sees {facts['faiss_gpus']} GPU(s), torch sees {facts['torch_gpus']}: {hint}")
    return problems


def doctor(roots: tuple[str, ...] = DRIVER_ROOTS) -> DoctorReport:
    """`featshard doctor` as a function."""
    facts = {**machine_facts(roots), **torch_facts(), **faiss_facts()}
    facts["faiss_gpus_match_torch"] = facts.get("faiss_gpus") == facts["torch_gpus"]
    return DoctorReport(facts, diagnose(facts, roots))

"""Models by name from torchvision's registry (or timm's: `timm:NAME`, featshard.extract.timmmodels), their weights
(DEFAULT | none | PATH), layer, pooling and precision."""
from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

from featshard.errors import FeatshardError, UsageError
from featshard.system import sha256_file
from featshard.extract.preprocess import Preprocess, from_transforms
from featshard.extract.timmmodels import build_timm, check_timm_name, is_timm, timm_identity, timm_preprocess

if TYPE_CHECKING:
    import torch

log = logging.getLogger("featshard.extract.models")
POOLS = ("avg", "max", "gem")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    weights: str = "DEFAULT"  # "DEFAULT" | "none" | a local file path
    layer: str | None = None  # None: the output just before the classifier
    pool: str = "avg"
    normalize: bool = True
    precision: str = "fp32"  # resolved: fp32 | bf16 | fp16 (see resolve_precision)
    seed: int = 0
    graph: str = "eager"  # eager | jit | compile | auto (featshard.extract.graph; `run --graph` defaults to auto)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_model_name(name: str) -> None:
    import torchvision

    if is_timm(name):
        return check_timm_name(name)

    if name not in torchvision.models.list_models(module=torchvision.models):
        close = [m for m in torchvision.models.list_models(module=torchvision.models) if name[:4] in m][:8]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise UsageError(f"unknown model {name!r}: not a torchvision classification model{hint}")


def weights_enum(name: str) -> Any:
    import torchvision

    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError) as exc:
        raise UsageError(f"model {name!r} has no weights in torchvision's registry: {exc}") from exc


def preprocess_for(name: str, weights: str = "DEFAULT", **overrides: Any) -> Preprocess:
    """The preprocessing recipe of the weights in use: torchvision's own weights are recognised (also as a local
    file, by the sha256 prefix torchvision puts in its file names); random init and fine-tuned files use DEFAULT's."""
    if is_timm(name):  # the pretrained tag's eval transform
        return timm_preprocess(name, **overrides)
    return from_transforms(matching_enum(name, weights).transforms(), **overrides)


def matching_enum(name: str, weights: str) -> Any:
    default = weights_enum(name)
    if weights in ("DEFAULT", "none") or not os.path.isfile(weights):
        return default
    import torchvision

    digest = file_sha256(weights)
    for member in torchvision.models.get_model_weights(name):
        match = re.search(r"-([0-9a-f]{8,})\.pth$", member.url)
        if match and digest.startswith(match.group(1)):
            return member
    return default


def weights_identity(spec: ModelSpec) -> str:
    """What identifies the weights in the fingerprint: the file hash, the torchvision file name, or the seed."""
    if spec.weights.lower() == "none":
        return f"none:seed={spec.seed}"
    if spec.weights == "DEFAULT" and is_timm(spec.name):
        return timm_identity(spec.name)
    if spec.weights == "DEFAULT":
        return "torchvision:" + os.path.basename(weights_enum(spec.name).url)
    return "sha256:" + file_sha256(spec.weights)


def file_sha256(path: str) -> str:
    """The weights file's sha256, or a UsageError saying why it cannot be read."""
    if not os.path.isfile(path):
        raise UsageError(f"--weights {path!r}: no such file (use DEFAULT, none, or a local .pth file)")
    try:
        return sha256_file(path)
    except OSError as exc:
        raise UsageError(f"--weights {path!r}: cannot read: {exc}") from exc


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_precision(requested: str, device_kind: str,
                      capabilities: Sequence[tuple[int, int]] | None = None) -> str:
    """`auto` -> the fastest precision whose fidelity we measured as acceptable on this kind of device: on GPUs bf16
    where every selected device has it (compute capability >= 8.0, Ampere and later), else fp16. `capabilities` are
    the selected devices' `torch.cuda.get_device_capability` (the coordinator passes what its probe subprocess saw,
    so it never initialises CUDA; None asks torch in this process). Every node of a job decides from its own devices
    the same way; a node that would decide otherwise is refused by the fingerprint check."""
    if requested not in PRECISIONS:
        raise UsageError(f"--precision {requested!r}: choose from {', '.join(PRECISIONS)}")
    if requested != "auto":
        if requested == "fp16" and device_kind == "cpu":
            raise UsageError("--precision fp16 is for GPUs; on CPU use bf16 or fp32")
        return requested
    if device_kind == "cpu":
        choice = "bf16" if cpu_has_bf16() else "fp32"
        log.info("--precision auto: %s (%s)", choice, "the CPU has native bf16" if choice == "bf16" else
                 "no native bf16 on this CPU")
        return choice
    caps = list(_local_capabilities() if capabilities is None else capabilities)
    choice = "bf16" if caps and all(tuple(c) >= (8, 0) for c in caps) else "fp16"
    shown = ", ".join(sorted({f"{c[0]}.{c[1]}" for c in caps})) or "unknown"
    log.info("--precision auto: %s (compute capability %s of %d selected GPU(s); bf16 needs 8.0 or newer on all)",
             choice, shown, len(caps))
    return choice


def _local_capabilities() -> list[tuple[int, int]]:
    """Every GPU torch sees in this process (initialises CUDA: for in-process tools such as bench)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]  # type: ignore


def build_model(spec: ModelSpec, device: str = "cpu") -> torch.nn.Module:
    """The torchvision (or timm) model with its weights loaded, in eval mode. On `device="meta"` (the coordinator's
    probe) nothing is allocated or computed, but a weights file is still read and checked against the model's
    shapes."""
    import warnings

    import torch
    import torchvision

    if is_timm(spec.name):
        return build_timm(spec.name, spec.weights, spec.seed, device)
    check_model_name(spec.name)
    with torch.device(device), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        if spec.weights.lower() == "none":
            torch.manual_seed(spec.seed)  # identical random init in every worker
            model = torchvision.models.get_model(spec.name, weights=None)
        elif spec.weights == "DEFAULT":
            model = torchvision.models.get_model(spec.name, weights=None)
            model.load_state_dict(_download_default(spec.name))
        else:
            model = _from_file(spec.name, spec.weights)
    return model.eval()


def library_versions() -> dict[str, str]:
    """The versions of what computes the vectors (recorded in the manifest and in every shard file)."""
    import platform

    import h5py
    import numpy
    import PIL
    import torch
    import torchvision

    from featshard import __version__

    out = {"featshard": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
           "numpy": numpy.__version__, "h5py": h5py.__version__, "pillow": PIL.__version__,
           "python": platform.python_version()}
    if "timm" in sys.modules:  # imported by a timm model: not imported just to say its version
        out["timm"] = sys.modules["timm"].__version__
    return out


def _download_default(name: str) -> dict[str, Any]:
    enum = weights_enum(name)
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # noqa: BLE001 - urllib/OSError/RuntimeError all mean the same to the user
        raise FeatshardError(
            f"could not get torchvision's DEFAULT weights for {name} ({enum.url}): {exc}. "
            "Offline? Pass a local file with --weights PATH (or --weights none for random init)."
        ) from exc


def _from_file(name: str, path: str) -> torch.nn.Module:
    import torch
    import torchvision

    file_sha256(path)  # clear error for a missing or unreadable file
    state = _load_state_dict(path)
    model = torchvision.models.get_model(name, weights=None)
    num_classes = _classifier_outputs(model, state)
    if num_classes is not None:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UsageError(f"--weights {path}: does not fit {name}: {str(exc).splitlines()[0]} "
                         f"{_key_summary(exc)}") from exc
    del torch
    return model


def _key_summary(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines()[1:3]]
    return " ".join(lines)[:300]


def _load_state_dict(path: str) -> dict[str, Any]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a full pickled model needs weights_only=False
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"--weights {path}: not a readable PyTorch checkpoint: {exc}") from exc
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"--weights {path}: expected a state_dict or a checkpoint holding one")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _classifier_outputs(model: Any, state: dict[str, Any]) -> int | None:
    """A fine-tuned checkpoint may have another number of classes: read it from the last Linear's weight."""
    name = last_linear(model)
    weight = state.get(f"{name}.weight")
    if weight is None or weight.ndim != 2:
        return None
    return int(weight.shape[0])


def last_linear(model: torch.nn.Module) -> str:
    import torch

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not names:
        raise UsageError("model has no Linear classifier; pass --layer explicitly")
    return names[-1]

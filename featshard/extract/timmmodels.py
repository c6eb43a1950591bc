"""timm models: `--model timm:NAME` (`timm:vit_small_patch14_dinov2.lvd142m`, `timm:convnext_tiny`,
`timm:resnet50.a1_in1k`, ...; NAME is `architecture[.pretrained_tag]`, timm's default tag when none is given).

- Model: `timm.create_model(NAME, num_classes=0)`; features = the pooled pre-logits,
  `forward_head(forward_features(x), pre_logits=True)` (the class token or pooled map, as the model pools), unless
  `--layer NODE` picks an FX node (timm's `get_graph_node_names`), which `--pool` then pools.
- Weights: `DEFAULT` = timm's pretrained weights for the tag (from the Hugging Face hub or its cache: fails offline
  with a message naming the tag), `none` = seeded random init (the same in every worker), or a local file
  (safetensors or a .pth state_dict / checkpoint) loaded strictly, a classifier head in it being dropped.
- Preprocessing: `timm.data.resolve_model_data_config` of the tag, mapped like timm's eval transform: resize the
  shorter side to floor(crop / crop_pct) with its interpolation (antialiased, PIL), centre crop, its mean/std. Models
  whose eval crop is not a centre crop of a square (crop_mode squash/border) are refused.
- Fingerprint: timm's version and the `architecture.tag` (`timm_fields`).
"""
from __future__ import annotations

import difflib
import math
import os
from typing import TYPE_CHECKING, Any, Protocol, cast

from featshard.errors import FeatshardError, UsageError
from featshard.extract.preprocess import Preprocess

if TYPE_CHECKING:
    import torch

PREFIX = "timm:"
HEAD_LAYER = "pre_logits"  # the default feature: forward_head(..., pre_logits=True)
HEAD_POOL = "model"  # the pooling the model itself does before its classifier


def is_timm(name: str) -> bool:
    return name.startswith(PREFIX)


def _timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise UsageError("--model timm:... needs timm (pip install 'featshard[timm]')") from exc
    return timm


def check_timm_name(name: str) -> None:
    """An architecture timm knows, with a pretrained tag it has; else UsageError with the close matches."""
    timm = _timm()
    full = name[len(PREFIX):]
    arch, tag = timm.models.split_model_name_tag(full)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=6, cutoff=0.6)
        hint = f"; close matches: {', '.join(PREFIX + c for c in close)}" if close else ""
        raise UsageError(f"unknown timm model {arch!r} (from --model {name}){hint}")
    if tag:
        try:
            timm.models.get_pretrained_cfg(full)
        except RuntimeError:
            tags = timm.list_pretrained(f"{arch}.*")
            close = difflib.get_close_matches(full, tags, n=6, cutoff=0.5) or tags[:6]
            raise UsageError(f"timm model {arch!r} has no pretrained tag {tag!r}; tags: "
                             f"{', '.join(PREFIX + c for c in close)}") from None


def _meta_model(name: str) -> torch.nn.Module:
    """The model built on the meta device (no memory, no init): enough for its configs."""
    import torch

    timm = _timm()
    try:
        with torch.device("meta"):
            return timm.create_model(name[len(PREFIX):], pretrained=False, num_classes=0)
    except Exception:  # noqa: BLE001 - a model whose __init__ needs real tensors
        return timm.create_model(name[len(PREFIX):], pretrained=False, num_classes=0)


def pretrained_tag(name: str) -> str:
    """`architecture.tag` of the pretrained config in use (timm's default tag when the name gives none)."""
    cfg = pretrained_cfg(_meta_model(name))
    return f"{cfg.get('architecture')}.{cfg.get('tag')}" if cfg.get("tag") else str(cfg.get("architecture"))


def timm_preprocess(name: str, **overrides: Any) -> Preprocess:
    """timm's eval transform for the tag, as a Preprocess (see the module doc)."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(_meta_model(name))
    _, height, width = cfg["input_size"]
    mode = cfg.get("crop_mode") or "center"
    if height != width or mode != "center":
        raise UsageError(f"--model {name}: timm's eval preprocessing is input {height}x{width} with crop_mode "
                         f"{mode!r}; featshard supports a centre crop of a square (crop_mode 'center') only")
    if len(cfg["mean"]) != 3 or len(cfg["std"]) != 3:
        raise UsageError(f"--model {name}: expects {len(cfg['mean'])} input channels; featshard feeds RGB")
    crop_pct = cfg.get("crop_pct") or 0.875  # timm's DEFAULT_CROP_PCT
    return Preprocess(resize=math.floor(height / crop_pct), crop=int(height), interpolation=str(cfg["interpolation"]),
                      antialias=True, mean=tuple(float(x) for x in cfg["mean"]),  # type: ignore[arg-type]
                      std=tuple(float(x) for x in cfg["std"]), **overrides)  # type: ignore[arg-type]


def timm_fields(name: str) -> dict[str, str]:
    """What the fingerprint records about timm: its version and the pretrained tag."""
    return {"version": _timm().__version__, "pretrained_tag": pretrained_tag(name)}


def timm_identity(name: str) -> str:
    """What identifies timm's pretrained (DEFAULT) weights in the fingerprint: the tag."""
    return f"timm:{pretrained_tag(name)}"


def build_timm(name: str, weights: str, seed: int, device: str = "cpu") -> torch.nn.Module:
    """The timm model without its classifier, weights loaded, in eval mode, on `device` ("meta": nothing allocated,
    but the weights are still found and checked against the model's shapes)."""
    import warnings

    import torch

    timm = _timm()
    check_timm_name(name)
    with torch.device(device), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        if weights == "DEFAULT":
            return _pretrained(name).eval()
        torch.manual_seed(seed)  # identical random init in every worker
        model = timm.create_model(name[len(PREFIX):], pretrained=False, num_classes=0)
        if weights != "none":
            load_file(model, weights, name)
    return model.eval()


def _pretrained(name: str) -> Any:
    """timm's pretrained model: from the local Hugging Face cache when the file is there (no network), else
    downloaded; offline without it, a FeatshardError naming the tag at once (not after the hub's minute of
    retries)."""
    timm = _timm()
    full, cfg = name[len(PREFIX):], pretrained_cfg(_meta_model(name))
    tag = pretrained_tag(name)
    cached = _hub_cached_file(cfg)
    try:
        if cached:
            return timm.create_model(full, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": cached})
        if cfg.get("hf_hub_id"):
            _check_hub_reachable(tag)
        return timm.create_model(full, pretrained=True, num_classes=0)
    except FeatshardError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub, network and cache errors all mean the same to the user
        raise FeatshardError(f"could not get timm's pretrained weights {tag} for {name}: {type(exc).__name__}: "
                             f"{str(exc)[:300]}. {_OFFLINE_HINT}") from exc


_OFFLINE_HINT = "Pass a local file with --weights PATH (safetensors or .pth), or --weights none for random init."
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm asks the hub for, in its order


def _hub_cached_file(cfg: Any) -> str | None:
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    names = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else _HUB_FILES
    for filename in names:
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _check_hub_reachable(tag: str) -> None:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=10).close()
    except OSError as exc:
        raise FeatshardError(f"timm's pretrained weights {tag} are not in the local Hugging Face cache and "
                             f"{url.hostname} cannot be reached ({exc}): offline? {_OFFLINE_HINT}") from exc


def load_file(model: torch.nn.Module, path: str, name: str) -> None:
    """Load a safetensors or PyTorch file (a state_dict or a checkpoint holding one, read by timm's
    `load_state_dict`: EMA weights first, `module.` prefixes removed) into `model` strictly, except for classifier
    weights (dropped)."""
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise UsageError(f"--weights {path!r}: no such readable file (use DEFAULT, none, or a local file)")
    state = _read_safetensors(path) if _is_safetensors(path) else _read_torch(path)
    own = set(model.state_dict())
    heads = pretrained_cfg(model).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    state = {k: v for k, v in state.items() if k in own or not any(k.startswith(h + ".") for h in heads)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = " ".join(ln.strip() for ln in str(exc).splitlines()[1:3])[:300]
        raise UsageError(f"--weights {path}: does not fit {name}: {lines}") from exc


def _is_safetensors(path: str) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def _read_safetensors(path: str) -> dict[str, Any]:
    from safetensors.torch import load_file as st_load
    from timm.models import clean_state_dict

    try:
        return clean_state_dict(st_load(path, device="cpu"))  # type: ignore[no-any-return, unused-ignore]
    except Exception as exc:  # noqa: BLE001 - SafetensorError and friends
        raise UsageError(f"--weights {path}: not a readable safetensors file: {exc}") from exc


def _read_torch(path: str) -> dict[str, Any]:
    import torch
    from timm.models import load_state_dict

    try:
        state = load_state_dict(path, device="cpu")
    except Exception as exc:  # noqa: BLE001 - unpickling errors vary
        raise UsageError(f"--weights {path}: not a readable PyTorch checkpoint: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"--weights {path}: expected a state_dict or a checkpoint holding one")
    return state


class _TimmNet(Protocol):
    """What featshard calls on a timm model besides nn.Module's methods."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...


def pretrained_cfg(model: torch.nn.Module) -> dict[str, Any]:
    """timm's pretrained config of a model (a dict on every timm model)."""
    cfg: dict[str, Any] = getattr(model, "pretrained_cfg", None) or {}
    return cfg


def head_net(model: torch.nn.Module) -> torch.nn.Module:
    """The default feature network: `{"feat": forward_head(forward_features(x), pre_logits=True)}`."""
    import torch

    class TimmPreLogits(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.model = inner

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            model = cast(_TimmNet, self.model)
            return {"feat": model.forward_head(model.forward_features(x), pre_logits=True)}

    return TimmPreLogits(model)


def timm_feature_net(model: torch.nn.Module, layer: str | None) -> tuple[str, torch.nn.Module]:
    """(layer name, network returning {"feat": ...}): the pre-logits by default, else the FX node `layer`."""
    if layer in (None, HEAD_LAYER):
        return HEAD_LAYER, head_net(model).eval()
    from timm.models import create_feature_extractor, get_graph_node_names

    try:
        _, nodes = get_graph_node_names(model)
    except Exception as exc:  # noqa: BLE001 - FX tracing errors vary
        raise UsageError(f"cannot trace the timm model graph to find --layer {layer!r}: {exc}; use the default "
                         f"(--layer {HEAD_LAYER})") from exc
    if layer not in nodes:
        raise UsageError(f"unknown --layer {layer!r}; the model's last nodes are: {', '.join(nodes[-12:])} "
                         f"(or {HEAD_LAYER}, the default: the pooled pre-logits)")
    return layer, create_feature_extractor(model, return_nodes={layer: "feat"}).eval()

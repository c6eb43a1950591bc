"""The feature head: a layer of a torchvision model, pooled, L2-normalised, run at the chosen precision.

Input is a uint8 NHWC batch (what the loaders hand over); normalisation by the weights' mean/std happens here, on the
device, so only bytes cross from the loader processes.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np

from featshard.errors import UsageError
from featshard.models import ModelSpec, build_model, last_linear
from featshard.preprocess import Preprocess

log = logging.getLogger("featshard.extractor")


def default_layer(model: Any, eval_nodes: list[str]) -> str:
    """The node just before the final classifier (e.g. `flatten` for ResNet/MobileNet, the class token for ViT)."""
    head = last_linear(model)
    if head not in eval_nodes:
        raise UsageError(f"cannot find the classifier node {head!r} in the model graph; pass --layer")
    pos = eval_nodes.index(head)
    if pos == 0:
        raise UsageError("the classifier is the first node; pass --layer")
    return eval_nodes[pos - 1]


def resolve_layer(model: Any, layer: str | None) -> str:
    from torchvision.models.feature_extraction import get_graph_node_names

    try:
        _, eval_nodes = get_graph_node_names(model)
    except Exception as exc:  # noqa: BLE001 - FX tracing errors vary
        raise UsageError(f"cannot trace the model graph to pick a layer: {exc}") from exc
    if layer is None:
        return default_layer(model, eval_nodes)
    if layer not in eval_nodes:
        tail = ", ".join(eval_nodes[-12:])
        raise UsageError(f"unknown --layer {layer!r}; the model's last nodes are: {tail} "
                         "(torchvision.models.feature_extraction.get_graph_node_names lists all)")
    return layer


def pool_features(x: Any, pool: str, gem_p: float = 3.0) -> Any:
    """Reduce a feature map (N,C,H,W) or token sequence (N,L,C) to (N,D); a (N,D) tensor passes through."""
    import torch

    if x.ndim == 2:
        return x
    if x.ndim == 4:
        x = x.flatten(2)  # N, C, HW
        dim = 2
    elif x.ndim == 3:
        dim = 1  # N, L, C: pool over tokens
    else:
        x = x.flatten(1)
        return x
    if pool == "avg":
        return x.mean(dim=dim)
    if pool == "max":
        return x.amax(dim=dim)
    if pool == "gem":
        return x.clamp(min=1e-6).pow(gem_p).mean(dim=dim).pow(1.0 / gem_p)
    raise UsageError(f"unknown --pool {pool!r}")
    del torch


class Extractor:
    """Built inside the worker (never pickled): model + layer + pooling on one device."""

    def __init__(self, spec: ModelSpec, prep: Preprocess, device: str) -> None:
        import torch
        from torchvision.models.feature_extraction import create_feature_extractor

        self.spec, self.prep, self.device = spec, prep, torch.device(device)
        model = build_model(spec)
        self.layer = resolve_layer(model, spec.layer)
        self.net = create_feature_extractor(model, return_nodes={self.layer: "feat"}).eval()
        self.net = self.net.to(self.device, memory_format=torch.channels_last)
        self.mean = torch.tensor(prep.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(prep.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self.dim = int(self(np.zeros((1, prep.crop, prep.crop, 3), np.uint8)).shape[1])

    def autocast(self) -> Any:
        import torch

        if self.spec.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.spec.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def to_device(self, batch: Any) -> Any:
        """uint8 NHWC (numpy or CPU tensor, pinned if possible) → float NCHW channels_last, normalised, on device."""
        import torch

        x = torch.as_tensor(batch).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()  # NHWC storage viewed as NCHW = channels_last
        return (x - self.mean) / self.std

    def forward_device(self, x: Any) -> Any:
        import torch

        with torch.inference_mode(), self.autocast():
            feats = pool_features(self.net(x)["feat"], self.spec.pool).float()
        if self.spec.normalize:
            feats = torch.nn.functional.normalize(feats, dim=1)
        return feats

    def __call__(self, batch: Any) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.forward_device(self.to_device(batch)).cpu().numpy()

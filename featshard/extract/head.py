"""The feature head's pieces: which layer of a torchvision model to read (the classifier's input by default) and how
its output is pooled into one vector per image."""
from __future__ import annotations

from typing import TYPE_CHECKING

from featshard.errors import UsageError
from featshard.extract.models import ModelSpec, last_linear
from featshard.extract.timmmodels import is_timm, timm_feature_net

if TYPE_CHECKING:
    import torch


def default_layer(model: torch.nn.Module, eval_nodes: list[str]) -> str:
    """The node just before the final classifier (e.g. `flatten` for ResNet/MobileNet, the class token for ViT)."""
    head = last_linear(model)
    if head not in eval_nodes:
        raise UsageError(f"cannot find the classifier node {head!r} in the model graph; pass --layer")
    pos = eval_nodes.index(head)
    if pos == 0:
        raise UsageError("the classifier is the first node; pass --layer")
    return eval_nodes[pos - 1]


def resolve_layer(model: torch.nn.Module, layer: str | None) -> str:
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


def feature_net(spec: ModelSpec, model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """(layer, network returning {"feat": tensor}): a torchvision FX feature extractor at the layer, or for timm
    models their pooled pre-logits (or an FX node with --layer)."""
    if is_timm(spec.name):
        return timm_feature_net(model, spec.layer)
    from torchvision.models.feature_extraction import create_feature_extractor

    layer = resolve_layer(model, spec.layer)
    return layer, create_feature_extractor(model, return_nodes={layer: "feat"}).eval()


def pool_features(x: torch.Tensor, pool: str, gem_p: float = 3.0) -> torch.Tensor:
    """Reduce a feature map (N,C,H,W) or token sequence (N,L,C) to (N,D); a (N,D) tensor passes through."""
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

"""The coordinator's model check before any worker starts: layer and dim of the model the workers will build."""
from __future__ import annotations

import logging
from dataclasses import replace

from featshard.errors import FeatshardError, UsageError
from featshard.extract.extractor import Extractor
from featshard.extract.head import feature_net, pool_features
from featshard.extract.models import ModelSpec, build_model
from featshard.extract.preprocess import Preprocess

log = logging.getLogger("featshard.probe")


def probe(spec: ModelSpec, prep: Preprocess) -> tuple[str, int]:
    """(layer, dim) of the model the workers will build, checked before any worker starts: a bad name, layer or
    weights file fails here. Built on the `meta` device (nothing allocated, nothing computed) where the model allows
    it; on the CPU otherwise (a few models compute their shapes from real tensors while being built)."""
    import torch

    try:
        model = build_model(spec, device="meta")
    except FeatshardError:
        raise
    except Exception as exc:  # noqa: BLE001 - model construction that needs real tensors: probe on the CPU
        log.debug("probing %s on the CPU (meta: %s)", spec.name, exc)
        return _probe_cpu(spec, prep)
    try:
        layer, net = feature_net(spec, model)
        out = pool_features(net(torch.zeros((1, 3, prep.crop, prep.crop), device="meta"))["feat"], spec.pool)
    except UsageError:  # an unknown --layer
        raise
    except Exception as exc:  # noqa: BLE001 - an operator without a meta kernel
        log.debug("probing %s on the CPU (meta forward: %s)", spec.name, exc)
        return _probe_cpu(spec, prep)
    return layer, int(out.reshape(out.shape[0], -1).shape[1])


def _probe_cpu(spec: ModelSpec, prep: Preprocess) -> tuple[str, int]:
    ext = Extractor(replace(spec, graph="eager"), prep, "cpu", compile=False)
    return ext.layer, ext.dim

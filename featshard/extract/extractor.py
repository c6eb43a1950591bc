"""The feature head: a layer of a torchvision model, pooled, L2-normalised, run at the chosen precision.

Input is a uint8 NHWC batch (what the loaders hand over); normalisation by the weights' mean/std happens here, on the
device, so only bytes cross from the loader processes. With `--decode gpu` on a CUDA device, `batch_to_device` decodes
the batch's JPEG bytes there
(featshard.extract.gpudecode); on a CPU device that mode falls back to the loaders' fast decode.

Speed levers, measured on the 2-core CPU boxes (issue 4): channels_last weights and input (the uint8 NHWC batch viewed
as NCHW is already channels_last) and bf16 autocast on CPUs with native bf16 roughly double and triple the fp32
rate. The graph (featshard.extract.graph):
`auto` keeps a TorchScript version where it measurably wins (MobileNetV2 fp32 on
the AVX2 box: 1.5x); `torch.compile` (`--graph compile`, or FEATSHARD_COMPILE=1) gave about 1.8x more on top
(MobileNetV2 and ResNet-50, bf16, per CPU-second) after a one-time compilation of 30-120 s per process (Inductor caches
it on disk: ~5 s after the first run): worth it for long runs, not for short ones. The worker tunes its process's
malloc before building one (featshard.runner.runtime: 1.5-2.2x on the AVX2 box, where page faults dominated the model).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import replace
from typing import Any, Iterable

import numpy as np

from featshard.errors import FeatshardError, UsageError
from featshard.extract.loader import Batch, decodes_on_device, make_loader
from featshard.extract.models import ModelSpec, build_model, last_linear
from featshard.extract.preprocess import Preprocess
from featshard.extract.timmmodels import is_timm, timm_feature_net
from featshard.store.inputs import Item

log = logging.getLogger("featshard.extract.extractor")
_warned_gpu_decode = False


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


def feature_net(spec: ModelSpec, model: Any) -> tuple[str, Any]:
    """(layer, network returning {"feat": tensor}): a torchvision FX feature extractor at the layer, or for timm
    models their pooled pre-logits (or an FX node with --layer)."""
    if is_timm(spec.name):
        return timm_feature_net(model, spec.layer)
    from torchvision.models.feature_extraction import create_feature_extractor

    layer = resolve_layer(model, spec.layer)
    return layer, create_feature_extractor(model, return_nodes={layer: "feat"}).eval()


def pool_features(x: Any, pool: str, gem_p: float = 3.0) -> Any:
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


class Extractor:
    """Built inside the worker (never pickled): model + layer + pooling on one device."""

    def __init__(self, spec: ModelSpec, prep: Preprocess, device: str, compile: bool | None = None,
                 batch_size: int | None = None, device_decode: bool | None = None) -> None:
        """The network runs as `spec.graph` says (featshard.extract.graph); `compile=True` (or env
        FEATSHARD_COMPILE=1 when `compile` is None) forces torch.compile, compiled here for batches of `batch_size`
        (default: the run's default, 32 on CPU, 128 on GPU; smaller batches are padded). `device_decode` (default:
        `--decode gpu` on CUDA) decodes JPEGs with torchvision on `device`: forced on a CPU, the geometry of the GPU
        path can be checked without a GPU."""
        import torch

        self.spec, self.prep, self.device = spec, prep, torch.device(device)
        self.pad_to = 0  # compiled: batches are padded to the largest size seen (one static shape, no recompiles)
        self.compiled = False
        self.layer, self.net = feature_net(spec, build_model(spec))
        self.net = self.net.to(self.device, memory_format=torch.channels_last)
        self.mean = torch.tensor(prep.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(prep.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self.dim = int(self(np.zeros((1, prep.crop, prep.crop, 3), np.uint8)).shape[1])
        self.device_decode = decodes_on_device(prep, str(self.device)) if device_decode is None else device_decode
        if prep.decode == "gpu" and not self.device_decode:
            _warn_gpu_decode_fallback(str(self.device))
        if compile is None:
            compile = os.environ.get("FEATSHARD_COMPILE", "0") == "1"
        self.graph, self.graph_info = self._set_graph("compile" if compile else spec.graph, batch_size)

    def _set_graph(self, graph: str, batch_size: int | None) -> tuple[str, dict[str, float]]:
        from featshard.extract.graph import check_graph, choose_cpu_graph, to_torchscript

        check_graph(graph, self.spec.precision)
        size = batch_size or (128 if self.device.type == "cuda" else 32)
        if graph == "compile":
            import torch

            self.net, self.compiled = torch.compile(self.net, dynamic=False), True
            self.forward_device(self.to_device(np.zeros((size, self.prep.crop, self.prep.crop, 3), np.uint8)))
            return "compile", {}
        auto_eager = self.device.type != "cpu" or self.spec.precision != "fp32" or is_timm(self.spec.name)
        if graph == "eager" or (graph == "auto" and auto_eager):
            return "eager", {}
        rng = np.random.default_rng(0)  # photo-free but not constant input: a constant image hides fusion errors
        example = self.to_device(rng.integers(0, 256, (min(size, 8), self.prep.crop, self.prep.crop, 3), np.uint8))
        if graph == "jit":
            self.net = to_torchscript(self.net, example)
            return "jit", {}
        self.net, chosen, info = choose_cpu_graph(self.net, example, self._pooled)
        return chosen, info

    def _pooled(self, out: Any) -> Any:
        return pool_features(out["feat"], self.spec.pool)

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
        return self.normalise(x.permute(0, 3, 1, 2).float())  # NHWC storage viewed as NCHW = channels_last

    def normalise(self, x: Any) -> Any:
        """float NCHW pixels in [0, 255] -> the model's input (weights' mean/std)."""
        return (x - self.mean) / self.std

    def batch_to_device(self, batch: Any) -> Any:
        """A loader Batch's ok rows as the model's input on the device. With device decode (`batch.encoded`), JPEG
        bytes are decoded here and rows that cannot be decoded at all move to the batch's failed lists. The batch's
        pixels (and bytes) are released once on the device: a caller that keeps batches until their chunk is written
        keeps only rows and names (a 2048-row chunk of 224 x 224 pixels is 300 MB)."""
        import torch

        if getattr(batch, "encoded", None) is None:
            x = self.to_device(batch.pixels)
        else:
            from featshard.extract.gpudecode import decode_batch

            x = self.normalise(decode_batch(batch, self.prep, self.device))
            batch.encoded = None
        batch.pixels = torch.zeros((0, 0, 0, 3), dtype=torch.uint8)
        return x

    def forward_device(self, x: Any) -> Any:
        import torch

        if x.shape[0] == 0:  # every row of the batch failed to decode on the device
            return torch.zeros((0, self.dim), device=self.device)
        n = x.shape[0]
        if self.compiled:
            self.pad_to = max(self.pad_to, n)
            if n < self.pad_to:
                x = torch.cat([x, x.new_zeros((self.pad_to - n, *x.shape[1:]))]).contiguous(
                    memory_format=torch.channels_last)
        with torch.inference_mode(), self.autocast():
            feats = self._pooled(self.net(x))[:n].float()
        if self.spec.normalize:
            feats = torch.nn.functional.normalize(feats, dim=1)
        return feats

    def features(self, batch: Batch, stages: dict[str, float] | None = None) -> np.ndarray:
        """THE extraction step (worker, --retry-failed, search queries, serve, bench all come through here): the
        decoded rows of a loader Batch -> float32 (N, dim) on the host. After the call N == len(batch.rows): a device
        decode moves rows it cannot decode to the batch's failures. `stages` gets 'h2d' (copy and device decode) and
        'model' seconds added."""
        import torch

        if not len(batch.rows):
            return np.zeros((0, self.dim), np.float32)
        t = time.monotonic()
        x = self.batch_to_device(batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t2 = time.monotonic()
        with torch.inference_mode():
            feats = self.forward_device(x).cpu().numpy()
        if stages is not None:
            stages["h2d"] = stages.get("h2d", 0.0) + t2 - t
            stages["model"] = stages.get("model", 0.0) + time.monotonic() - t2
        return feats

    def loader(self, batches: Iterable[list[Item]], workers: int) -> Iterable[Batch]:
        """A loader over `batches` (lists of Items) whose Batches `features` takes: decoded the way this extractor
        needs (JPEG bytes for a device decode, pinned memory on CUDA)."""
        return make_loader(batches, self.prep, workers, pin=self.device.type == "cuda",
                           device_decode=self.device_decode)

    def __call__(self, batch: Any) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.forward_device(self.to_device(batch)).cpu().numpy()


def _warn_gpu_decode_fallback(device: str) -> None:
    global _warned_gpu_decode
    if not _warned_gpu_decode:
        log.warning("--decode gpu needs a CUDA device; %s decodes on the CPU instead (same as --decode fast)", device)
        _warned_gpu_decode = True

"""The feature head: a layer of a torchvision model, pooled, L2-normalised, run at the chosen precision.

Input is a uint8 NHWC batch (what the loaders hand over); normalisation by the weights' mean/std happens here, on the
device, so only bytes cross from the loader processes. With `--decode gpu` on a CUDA device, `batch_to_device` decodes
the batch's JPEG bytes there (featshard.extract.gpudecode); on a CPU device that mode falls back to the loaders' fast
decode.

One step, two halves: `submit(batch)` queues a batch (input preparation on a side lane, the model on the main one,
features copied back into pinned host memory, all asynchronous on a GPU) and returns a `Pending`; `Pending.result()`
waits for the features and books the stages' device time (CUDA events: no synchronize per batch). `features(batch)`
is both at once. The worker submits batch k+1 before it takes batch k's result, so on a GPU the decode and copy of
one batch overlap the model on the previous one; on a CPU the same code runs synchronously (featshard.extract.
devicesync). On a GPU: `cudnn.benchmark`, every batch padded to the fixed model batch (one shape, tuned once; the
default batch is 256), and on CUDA out-of-memory the model batch is halved (the loader batch is split) and recorded
in `batch_size_used`; no row is lost.

Speed levers, measured on the 2-core CPU boxes (issue 4): channels_last weights and input (the uint8 NHWC batch viewed
as NCHW is already channels_last) and bf16 autocast on CPUs with native bf16 roughly double and triple the fp32
rate. The graph (featshard.extract.graph): `auto` keeps a TorchScript version where it measurably wins (MobileNetV2
fp32 on the AVX2 box: 1.5x); `torch.compile` (`--graph compile`, or FEATSHARD_COMPILE=1) gave about 1.8x more on top
(MobileNetV2 and ResNet-50, bf16, per CPU-second) after a one-time compilation of 30-120 s per process (Inductor caches
it on disk: ~5 s after the first run): worth it for long runs, not for short ones. The worker tunes its process's
malloc before building one (featshard.runner.runtime: 1.5-2.2x on the AVX2 box, where page faults dominated the model).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any, Iterable, cast

import numpy as np

from featshard.extract.devicesync import Lane, Mark
from featshard.extract.head import feature_net, pool_features
from featshard.extract.batch import Batch
from featshard.extract.loader import decodes_on_device, make_loader
from featshard.extract.models import ModelSpec, build_model
from featshard.extract.preprocess import Preprocess
from featshard.extract.timmmodels import is_timm
from featshard.store.inputs import Item

if TYPE_CHECKING:
    import torch

log = logging.getLogger("featshard.extract.extractor")
_warned_gpu_decode = False
GPU_BATCH, CPU_BATCH = 256, 32  # default model batches


def default_batch(device: str) -> int:
    return GPU_BATCH if str(device).startswith("cuda") else CPU_BATCH


class Pending:
    """A submitted batch: its features (pinned host memory on a GPU, being filled) and the marks of its stages.
    `result()` waits for the features, adds each stage's device seconds to `stages` and returns float32 (N, dim)."""

    def __init__(self, host: np.ndarray | torch.Tensor, done: Mark | None = None,
                 spans: dict[str, tuple[Mark, Mark]] | None = None,
                 stages: dict[str, float] | None = None) -> None:
        self.host, self.done, self.spans, self.stages = host, done, spans or {}, stages

    def ready(self) -> bool:
        return self.done is None or self.done.ready()

    def result(self) -> np.ndarray:
        if self.done is not None:
            self.done.wait()
        if self.stages is not None:
            for key, (start, end) in self.spans.items():
                self.stages[key] = self.stages.get(key, 0.0) + start.seconds_to(end)
        self.spans = {}
        host = self.host
        return host if isinstance(host, np.ndarray) else host.numpy().copy()  # the pinned block goes back at once


class Extractor:
    """Built inside the worker (never pickled): model + layer + pooling on one device."""

    def __init__(self, spec: ModelSpec, prep: Preprocess, device: str, compile: bool | None = None,
                 batch_size: int | None = None, device_decode: bool | None = None) -> None:
        """The network runs as `spec.graph` says (featshard.extract.graph); `compile=True` (or env
        FEATSHARD_COMPILE=1 when `compile` is None) forces torch.compile, compiled here for batches of `batch_size`
        (default: the run's default, 32 on CPU, 256 on GPU). `device_decode` (default: `--decode gpu` on CUDA)
        decodes JPEGs with torchvision on `device`: forced on a CPU, the geometry of the GPU path can be checked
        without a GPU."""
        import torch

        self.spec, self.prep, self.device = spec, prep, torch.device(device)
        self.compiled = False
        self.batch = self.model_batch = batch_size or default_batch(str(self.device))
        self.main, self.side = Lane(self.device), Lane(self.device, side=True)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every batch has one shape (padded): tuned once
        self.layer, self.net = feature_net(spec, build_model(spec))
        # torch's stubs lack Module.to(device, memory_format=...), which it accepts: one conversion of the weights
        self.net = self.net.to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.mean = torch.tensor(prep.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(prep.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self.dim = int(self(np.zeros((1, prep.crop, prep.crop, 3), np.uint8)).shape[1])  # on a GPU: a full batch
        self.device_decode = decodes_on_device(prep, str(self.device)) if device_decode is None else device_decode
        if prep.decode == "gpu" and not self.device_decode:
            _warn_gpu_decode_fallback(str(self.device))
        if compile is None:
            compile = os.environ.get("FEATSHARD_COMPILE", "0") == "1"
        self.graph, self.graph_info = self._set_graph("compile" if compile else spec.graph)

    def _set_graph(self, graph: str) -> tuple[str, dict[str, float]]:
        from featshard.extract.graph import check_graph, choose_cpu_graph, to_torchscript

        check_graph(graph, self.spec.precision)
        if graph == "compile":
            import torch

            compiled = torch.compile(self.net, dynamic=False)  # an OptimizedModule: an nn.Module
            self.net, self.compiled = cast(torch.nn.Module, compiled), True
            self.forward_device(self.to_device(np.zeros((self.batch, self.prep.crop, self.prep.crop, 3), np.uint8)))
            return "compile", {}
        auto_eager = self.device.type != "cpu" or self.spec.precision != "fp32" or is_timm(self.spec.name)
        if graph == "eager" or (graph == "auto" and auto_eager):
            return "eager", {}
        rng = np.random.default_rng(0)  # photo-free but not constant input: a constant image hides fusion errors
        example = self.to_device(rng.integers(0, 256, (min(self.batch, 8), self.prep.crop, self.prep.crop, 3),
                                              np.uint8))
        if graph == "jit":
            self.net = to_torchscript(self.net, example)
            return "jit", {}
        self.net, chosen, info = choose_cpu_graph(self.net, example, self._pooled)
        return chosen, info

    @property
    def fixed_shape(self) -> bool:
        """Batches padded to `model_batch` (GPU: cudnn.benchmark tunes one shape; compiled: no recompiles)."""
        return self.compiled or self.device.type == "cuda"

    @property
    def batch_size_used(self) -> int:
        """The model batch in use: the configured one, halved on each CUDA out-of-memory."""
        return self.model_batch

    def _pooled(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return pool_features(out["feat"], self.spec.pool)

    def autocast(self) -> Any:
        import torch

        if self.spec.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.spec.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def to_device(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 NHWC (numpy or CPU tensor, pinned if possible) → float NCHW channels_last, normalised, on device."""
        import torch

        x = torch.as_tensor(batch).to(self.device, non_blocking=True)
        return self.normalise(x.permute(0, 3, 1, 2).float())  # NHWC storage viewed as NCHW = channels_last

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """float NCHW pixels in [0, 255] -> the model's input (weights' mean/std)."""
        return (x - self.mean) / self.std

    def batch_to_device(self, batch: Batch) -> torch.Tensor:
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

    def forward_device(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input (N, 3, H, W) on the device -> float32 (N, dim) features on the device, in slices of at
        most `model_batch` (padded to it with a fixed shape). On out-of-memory (torch.cuda.OutOfMemoryError: a GPU
        only) `model_batch` is halved and the whole input run again: no row is lost, none is run twice into the
        result."""
        import torch

        if x.shape[0] == 0:  # every row of the batch failed to decode on the device
            return torch.zeros((0, self.dim), device=self.device)
        while True:
            try:
                return self._forward_slices(x)
            except torch.cuda.OutOfMemoryError:
                if self.model_batch <= 1:
                    raise
                self.model_batch //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning("out of memory in the model at batch %d: running batches of %d from now on "
                            "(recorded as batch_size_used)", self.model_batch * 2, self.model_batch)

    def _forward_slices(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        n, step = x.shape[0], self.model_batch
        if n <= step:
            return self._forward(x, step if self.fixed_shape else n)
        return torch.cat([self._forward(x[i: i + step], step if self.fixed_shape else min(step, n - i))
                          for i in range(0, n, step)])

    def _forward(self, x: torch.Tensor, size: int) -> torch.Tensor:
        import torch

        n = x.shape[0]
        if n < size:
            x = torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))]).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self.autocast():
            feats = self._pooled(self.net(x))[:n].float()
        if self.spec.normalize:
            feats = torch.nn.functional.normalize(feats, dim=1)
        return feats

    def submit(self, batch: Batch, stages: dict[str, float] | None = None) -> Pending:
        """Queue a loader Batch: its input prepared on the side lane (device decode booked as 'decode', copy and
        normalisation as 'h2d'), the model on the main lane after it ('model', the copy back included), the
        features copied into pinned host memory. Returns at once on a GPU (the host waits only inside a device
        decode); computes everything now on a CPU. After `result()`, N == len(batch.rows): a device decode moves rows
        it cannot decode to the batch's failures."""
        import torch

        if not len(batch.rows):
            return Pending(np.zeros((0, self.dim), np.float32))
        stage = "decode" if getattr(batch, "encoded", None) is not None else "h2d"
        with torch.inference_mode():
            with self.side.active():
                start = self.side.mark()
                x = self.batch_to_device(batch)
                ready = self.side.mark()
            self.main.wait_for(ready)
            self.main.adopt(x)
            begin = self.main.mark()
            feats = self.forward_device(x)
            del x
            host = self._to_host(feats)
            done = self.main.mark()
        return Pending(host, done, {stage: (start, ready), "model": (begin, done)}, stages)

    def _to_host(self, feats: torch.Tensor) -> np.ndarray | torch.Tensor:
        import torch

        if feats.device.type != "cuda":
            return feats.numpy()
        host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
        return host.copy_(feats, non_blocking=True)

    def features(self, batch: Batch, stages: dict[str, float] | None = None) -> np.ndarray:
        """THE extraction step (worker, --retry-failed, search queries, serve, bench all come through here): the
        decoded rows of a loader Batch -> float32 (N, dim) on the host; `submit(batch).result()`. After the call
        N == len(batch.rows). `stages` gets 'decode' or 'h2d' and 'model' seconds added."""
        return self.submit(batch, stages).result()

    def loader(self, batches: Iterable[list[Item]], workers: int) -> Iterable[Batch]:
        """A loader over `batches` (lists of Items) whose Batches `features` takes: decoded the way this extractor
        needs (JPEG bytes for a device decode, pinned memory on CUDA)."""
        return make_loader(batches, self.prep, workers, pin=self.device.type == "cuda",
                           device_decode=self.device_decode)

    def __call__(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.forward_device(self.to_device(batch)).cpu().numpy()


def _warn_gpu_decode_fallback(device: str) -> None:
    global _warned_gpu_decode
    if not _warned_gpu_decode:
        log.warning("--decode gpu needs a CUDA device; %s decodes on the CPU instead (same as --decode fast)", device)
        _warned_gpu_decode = True

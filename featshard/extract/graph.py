"""How the feature network runs: eager, TorchScript (traced, frozen, optimised for inference) or torch.compile.

`--graph auto` (the default) on a CPU device at fp32 times eager against TorchScript on a small batch and keeps
TorchScript only if it is at least 10% faster and its features match eager's (cosine >= 0.9999); everywhere else it
runs eager. Measured on the 2-core AVX2 box (fp32, batch 32, malloc tuned): MobileNetV2 65.6 -> 100 images/s with
TorchScript (conversion 1.7 s, max abs difference 5e-15), ResNet-18 and ResNet-50 unchanged (+0-5%), ViT-B/16 slower;
torch.compile: MobileNetV2 93.5 images/s after a 48 s compilation. So `auto` picks by measuring, per model and machine.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from featshard.errors import UsageError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("featshard.extract.graph")
GRAPHS = ("auto", "eager", "jit", "compile")
MIN_COSINE = 0.9999
MIN_GAIN = 0.9  # keep TorchScript when it takes at most this fraction of eager's time


def check_graph(graph: str, precision: str) -> None:
    if graph not in GRAPHS:
        raise UsageError(f"--graph {graph!r}: choose from {', '.join(GRAPHS)}")
    if graph == "jit" and precision != "fp32":
        raise UsageError(f"--graph jit runs at fp32 only (TorchScript does not trace autocast); with --precision "
                         f"{precision} use --graph eager or compile")


def to_torchscript(net: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """Trace (on `example`), freeze (constants folded: batch norm into convolutions) and optimise for inference."""
    import warnings

    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values; the cosine check guards the result
        traced = torch.jit.trace(net, example, strict=False, check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))


def _best_time(fn: Callable[[], Any], runs: int = 2) -> float:
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def choose_cpu_graph(net: torch.nn.Module, example: torch.Tensor,
                     head: Callable[[Any], torch.Tensor]) -> tuple[torch.nn.Module, str, dict[str, float]]:
    """`auto` on a CPU at fp32: (network, "jit" | "eager", timings). `head(out)` turns a network output into the
    pooled features compared between the two."""
    import torch

    with torch.no_grad():
        ref = head(net(example))
        eager_s = _best_time(lambda: net(example))
        try:
            t = time.perf_counter()
            scripted = to_torchscript(net, example)
            for _ in range(2):  # the profiling executor optimises on the first runs
                out = head(scripted(example))
            convert_s = time.perf_counter() - t
        except Exception as exc:  # noqa: BLE001 - any tracing failure means: run eager
            log.info("graph auto: eager (TorchScript conversion failed: %s)", str(exc).splitlines()[0][:200])
            return net, "eager", {"eager_s": eager_s}
        jit_s = _best_time(lambda: scripted(example))
        cos = float(torch.nn.functional.cosine_similarity(out.float(), ref.float(), dim=1).min())
    info = {"eager_s": round(eager_s, 4), "jit_s": round(jit_s, 4), "convert_s": round(convert_s, 2),
            "min_cosine": round(cos, 6)}
    keep = jit_s <= MIN_GAIN * eager_s and cos >= MIN_COSINE
    log.info("graph auto: %s (per batch of %d: eager %.3f s, TorchScript %.3f s; cosine %.6f)",
             "jit" if keep else "eager", example.shape[0], eager_s, jit_s, cos)
    return (scripted, "jit", info) if keep else (net, "eager", info)

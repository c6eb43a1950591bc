"""Process-level tuning for inference workers: glibc malloc thresholds and the OpenMP wait policy.

Measured on the 2-core AVX2 box (2026-11-28, `python -m featshard bench`, fp32, batch 32, 2 threads):
- Page faults on these VMs are expensive, and glibc hands every allocation above 128 KiB (the dynamic threshold
  grows only to 32 MiB) to a fresh mmap that is returned on free: each batch's activation tensors (51 MB for one
  MobileNetV2 layer at batch 32) are faulted in again on every batch. A 1 GiB mmap and trim threshold keeps them in the
  heap: MobileNetV2 29.6 -> 65 images/s, ResNet-50 8.6 -> 14.5 images/s, page faults 1.4 M -> ~0 (sys time 5.3 s
  -> 0.2 s per 6 s). The price is a heap that stays at its peak (the model's working set) instead of shrinking.
  `tune_malloc` sets it in the running process (mallopt), so it works under every backend and under SLURM.
- OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning, so the model's threads do not steal the
  cores the decode loaders need (2-core box under load: seed loop 0.6-1.9 -> 11-12 images/s, featshard run steady
  state 10-14 -> 23-31). libgomp reads it when it starts, so `tune_process_env` runs before workers are spawned.
A variable the user has set (MALLOC_MMAP_THRESHOLD_, GLIBC_TUNABLES, OMP_WAIT_POLICY, ...) is always left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Any

log = logging.getLogger("featshard.runner.runtime")
RUNTIME_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
MALLOC_THRESHOLD = 1 << 30  # bytes: above any single activation tensor of the models we run
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_USER_MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_tuned: dict[str, Any] = {}


def tune_process_env(env: Any = None) -> dict[str, str]:
    """Set RUNTIME_ENV in `env` (default os.environ) where the user has not set those variables; returns what it set.
    Call before spawning worker processes: they read these at start."""
    target = os.environ if env is None else env
    applied = {k: v for k, v in RUNTIME_ENV.items() if k not in target}
    target.update(applied)
    return applied


def tune_malloc(threshold: int = MALLOC_THRESHOLD, env: Any = None) -> str:
    """Raise glibc's mmap and trim thresholds in this process (forked loaders inherit it). Returns what happened:
    "tuned", "already", "user" (the user set malloc variables: theirs win), "disabled" (FEATSHARD_MALLOC=0) or
    "unsupported" (not glibc)."""
    env = os.environ if env is None else env
    if env.get("FEATSHARD_MALLOC", "1") == "0":
        return "disabled"
    if any(k in env for k in _USER_MALLOC_VARS) or "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        return "user"
    if _tuned.get("threshold") == threshold:
        return "already"
    mallopt = _mallopt()
    if mallopt is None:
        return "unsupported"
    if not (mallopt(_M_MMAP_THRESHOLD, threshold) and mallopt(_M_TRIM_THRESHOLD, threshold)):
        log.debug("mallopt refused a threshold of %d bytes", threshold)
        return "unsupported"
    _tuned["threshold"] = threshold
    return "tuned"


def _mallopt() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn

"""The measurements behind `featshard bench`: each returns {"images", "wall_s", "cpu_s", "images_per_s", ...}.

- `decode_rate`: featshard's decoder (exact or fast) in a process pool over all cores, nothing else.
- `model_rate`: the Extractor on synthetic uint8 batches (no decoding), at a precision, optionally compiled, through
  the worker's submit-one-ahead loop (on a GPU: the model's rate when data is always ready).
- `device_decode_rate`: `--decode gpu`'s decode alone: loader processes hand over JPEG bytes, the device decodes.
- `run_rate`: a real `featshard run` subprocess: whole-process rate (model load included), steady-state rate from
  summary.json's stage timings, and the peak RSS of its process tree (coordinator, worker, loaders).
- `seed_loop`: what the user's old script did: PIL open, torchvision transforms, the model on a batch of 1, fp32.
- `plain_loader`: what a user would write with torch: a Dataset of PIL + torchvision transforms, a DataLoader
  (batch 64, default num_workers unless given), the model in fp32.
The last two run their model on the bench's device (a GPU's user moves the model there too).
`cpu_s` counts this process and its reaped children, so a busy shared machine shows as cpu_s / wall_s below the
cores in use.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from featshard.extract.preprocess import Preprocess

if TYPE_CHECKING:
    from featshard.extract.extractor import Pending



def _cpu_now() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(images: int, fn: Callable[[], Any]) -> dict[str, Any]:
    """Run fn once; images/s over the wall time, cpu seconds of this process and its reaped children."""
    cpu, t = _cpu_now(), time.perf_counter()
    extra = fn()
    wall, cpu_s = time.perf_counter() - t, _cpu_now() - cpu
    out = {"images": images, "wall_s": round(wall, 3), "cpu_s": round(cpu_s, 3),
           "images_per_s": round(images / wall, 2) if wall > 0 else 0.0}
    return {**out, **extra} if isinstance(extra, dict) else out


def _decode_some(task: tuple[list[str], Preprocess]) -> int:
    from featshard.extract.decode import ImageFailure, load_image

    paths, prep = task
    ok = 0
    for path in paths:
        try:
            load_image(path, prep)
            ok += 1
        except ImageFailure:
            pass
    return ok


def decode_rate(paths: Sequence[str], prep: Preprocess, mode: str, procs: int) -> dict[str, Any]:
    """featshard.extract.decode.load_image over `paths` in `procs` processes (fork), small tasks so no core idles."""
    prep = replace(prep, decode=mode)
    tasks = [(list(paths[i: i + 8]), prep) for i in range(0, len(paths), 8)]

    def go() -> dict[str, Any]:
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            ok = sum(pool.imap_unordered(_decode_some, tasks))
            pool.close()
            pool.join()
        return {"ok": ok, "processes": procs}

    return timed(len(paths), go)


def device_decode_rate(paths: Sequence[str], prep: Preprocess, device: str, procs: int,
                       batch: int = 256) -> dict[str, Any]:
    """`--decode gpu`'s decode stage alone (CUDA): `procs` loaders read the files and check the headers (and
    decode what the device does not), the device decodes and resizes in batches of `batch`, nothing else."""
    import torch

    from featshard.extract.gpudecode import decode_batch
    from featshard.extract.loader import make_loader
    from featshard.store.inputs import Item

    prep = replace(prep, decode="gpu")
    items = [Item(i, p, p) for i, p in enumerate(paths)]
    batches = [items[i: i + batch] for i in range(0, len(items), batch)]

    def go() -> dict[str, Any]:
        on_device = 0
        for b in make_loader(batches, prep, procs, pin=True, device_decode=True):
            if b.encoded is not None:
                on_device += sum(e is not None for e in b.encoded)
                decode_batch(b, prep, torch.device(device))
        torch.cuda.synchronize()
        return {"processes": procs, "batch": batch, "on_device": on_device}

    return timed(len(paths), go)


def isolated(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """fn(*args) in a fresh spawned process: what one measurement sets up (a tuned malloc, torch's thread pools, a
    compiled graph) cannot speed up or slow down the next one, and each starts as a user's script would."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def model_rate(name: str, precision: str, prep: Preprocess, batch: int, device: str, compile: bool,
               seconds: float, graph: str = "auto") -> dict[str, Any]:
    """Extractor throughput on random uint8 batches, as a featshard worker runs it (tuned malloc, the graph `auto`
    picks, batches submitted one ahead of the result taken: `Extractor.submit` / `Pending.result`, pinned input on
    a GPU): one warm-up batch (compilation included), then >= `seconds`."""
    import torch

    from featshard.extract.extractor import Extractor
    from featshard.extract.batch import Batch
    from featshard.extract.models import ModelSpec
    from featshard.runner.runtime import tune_malloc

    tune_malloc()  # as the worker does
    ext = Extractor(ModelSpec(name, "none", precision=precision, graph=graph), prep, device, compile=compile,
                    batch_size=batch)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, prep.crop, prep.crop, 3), np.uint8))
    if device.startswith("cuda"):
        x = x.pin_memory()

    def batch_of(pixels: Any) -> Batch:
        return Batch(list(range(batch)), [""] * batch, pixels, [], [], [])

    t = time.perf_counter()
    ext.features(batch_of(x))
    warm = time.perf_counter() - t
    stages: dict[str, float] = {}

    def go() -> dict[str, Any]:
        n, start = 0, time.perf_counter()
        pending: Pending | None = None
        while n < 3 * batch or time.perf_counter() - start < seconds:
            submitted = ext.submit(batch_of(x), stages)
            if pending is not None:
                pending.result()
            pending, n = submitted, n + batch
        if pending is not None:
            pending.result()
        return {"images": n}

    res = timed(0, go)
    res["images_per_s"] = round(res["images"] / res["wall_s"], 2)
    return {**res, "batch": batch, "threads": torch.get_num_threads(), "warmup_s": round(warm, 2),
            "graph": ext.graph, "model_busy": round(stages.get("model", 0.0) / res["wall_s"], 3)}


class TreeRss:
    """Peak memory of a process and its descendants, sampled (psutil): the coordinator's and the largest child's RSS
    at every sample, and the tree as the sum of proportional set sizes (pages shared by forked loaders counted once)
    every `pss_every` seconds only: reading a torch process's PSS costs ~50 ms of CPU, which at every 0.1 s sample
    took a third of a 2-core box away from the run being measured."""

    def __init__(self, pid: int, pss_every: float = 5.0) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.peak_total = self.peak_main = self.peak_child = 0
        self.pss_every, self.pss_at = pss_every, time.monotonic() + 1.0

    def sample(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
            rss = [p.memory_info().rss for p in procs]
            if time.monotonic() >= self.pss_at:
                self.pss_at = time.monotonic() + self.pss_every
                self.peak_total = max(self.peak_total, sum(p.memory_full_info().pss for p in procs))
        except psutil.Error:
            return
        self.peak_main = max(self.peak_main, rss[0])
        self.peak_child = max([self.peak_child, *rss[1:]])

    def to_dict(self) -> dict[str, float]:
        mb = 1 << 20
        return {"peak_pss_tree_mb": round(self.peak_total / mb, 1), "peak_rss_coordinator_mb":
                round(self.peak_main / mb, 1), "peak_rss_largest_child_mb": round(self.peak_child / mb, 1)}


def run_rate(lst: Path, out: Path, argv: Sequence[str], env: dict[str, str | None] | None = None) -> dict[str, Any]:
    """`python -m featshard run` as a subprocess; whole-process and steady-state rates, RSS of its tree.
    `env` is added to this process's environment for it (None: the variable is removed)."""
    out.mkdir(parents=True, exist_ok=True)
    full = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    cmd = [sys.executable, "-m", "featshard", "run", "--input", str(lst), "--out", str(out / "run"), "--overwrite",
           *argv]
    with open(out / "run.log", "w", encoding="utf-8") as log:
        def go() -> dict[str, Any]:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full)
            rss = TreeRss(proc.pid)
            while proc.poll() is None:
                rss.sample()
                time.sleep(0.2)
            return {"returncode": proc.returncode, **rss.to_dict()}

        res = timed(0, go)
    if res["returncode"] != 0:
        tail = (out / "run.log").read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"featshard run failed ({res['returncode']}): {' '.join(cmd)}\n{tail}")
    return {**res, **_summary_rates(json.loads((out / "run" / "summary.json").read_text()), res["wall_s"])}


def _summary_rates(summary: dict[str, Any], wall: float) -> dict[str, Any]:
    """Whole-process and steady-state rates: steady is the batch loop's wall time after the first batch (`loop`;
    the sum of the serial stages for runs that predate it); `model_busy` the model's share of it."""
    stages = summary["stages"]
    loop = stages.get("loop") or sum(stages.get(k, 0.0) for k in ("wait_data", "h2d", "model", "write"))
    processed = summary["processed_rows"]
    return {"images": processed, "ok": summary["ok"], "failed": summary["failed"],
            "images_per_s": round(processed / wall, 2), "steady_images_per_s": round(processed / loop, 2),
            "model_busy": round(stages.get("model", 0.0) / loop, 3) if loop else 0.0,
            "batch_size_used": summary.get("batch_size_used", 0), "stages": stages,
            "verdict": summary.get("verdict", "")}


def plain_model(name: str, device: str = "cpu") -> Any:
    """The torchvision model with its classifier replaced by Identity (penultimate features), fp32, eval, on
    `device`."""
    import torch
    import torchvision

    from featshard.extract.models import last_linear

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    parent, _, leaf = last_linear(model).rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, torch.nn.Identity())
    return model.to(device)


def plain_transform(prep: Preprocess) -> Any:
    from torchvision import transforms as T

    return T.Compose([T.Resize(prep.resize, interpolation=T.InterpolationMode(prep.interpolation)),
                      T.CenterCrop(prep.crop), T.ToTensor(), T.Normalize(prep.mean, prep.std)])


def seed_loop(name: str, paths: Sequence[str], prep: Preprocess, device: str = "cpu") -> dict[str, Any]:
    """One image at a time: PIL open + convert, transforms, model(x[None]) in fp32 on `device`, features back on
    the host (model built before timing)."""
    import torch
    from PIL import Image

    model, tf = plain_model(name, device), plain_transform(prep)

    def go() -> None:
        with torch.inference_mode():
            for path in paths:
                with Image.open(path) as im:
                    model(tf(im.convert("RGB"))[None].to(device)).cpu()

    return {**timed(len(paths), go), "threads": torch.get_num_threads()}


class _PlainDataset:
    def __init__(self, paths: Sequence[str], tf: Any) -> None:
        self.paths, self.tf = list(paths), tf

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.tf(im.convert("RGB"))


def plain_loader(name: str, paths: Sequence[str], prep: Preprocess, workers: int | None,
                 device: str = "cpu") -> dict[str, Any]:
    """torch DataLoader(batch_size=64, num_workers=<torch default 0 when None>) + the fp32 model on `device`."""
    import torch
    from torch.utils.data import DataLoader

    model = plain_model(name, device)
    dataset: Any = _PlainDataset(paths, plain_transform(prep))
    loader: Any = DataLoader(dataset, batch_size=64, num_workers=workers or 0)

    def go() -> None:
        with torch.inference_mode():
            for x in loader:
                model(x.to(device)).cpu()

    return {**timed(len(paths), go), "num_workers": loader.num_workers}

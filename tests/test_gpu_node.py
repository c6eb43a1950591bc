"""On a machine with CUDA (`make gpu-check`; every test here skips elsewhere): each worker on its own GPU, recorded
by UUID as nvidia-smi names it; a GPU run (up to 2 GPUs, bf16 where the GPUs have it) gives the CPU run's vectors;
`--decode gpu` gives the CPU decoder's vectors; the merge on a GPU (faiss GPU build) gives a working index."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import cli, make_images, mobilenet_weights, read_all, write_list

from featshard.runner.gpuprobe import nvidia_uuid

pytestmark = pytest.mark.gpu


def n_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def opts() -> list[str]:
    return ["--model", "mobilenet_v2", "--weights", mobilenet_weights(), "--batch-size", "16", "--chunk-size", "16",
            "--graph", "eager"]


@pytest.fixture(scope="module")
def listing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gpu")
    return write_list(root / "list.txt", [*make_images(root / "imgs", 40), root / "imgs" / "missing.jpg"])


def run(listing: Path, name: str, *extra: str) -> Path:
    out = listing.parent / name
    if not (out / "summary.json").exists():
        cli("run", "--input", str(listing), "--out", str(out), *opts(), *extra, check=True, timeout=600)
    return out


def vectors(out: Path) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    feats, failed = {}, {}
    for data in read_all(out).values():
        feats.update(zip(data["rows"].tolist(), data["features"].astype(np.float32)))
        failed.update(zip(data["failed_rows"].tolist(), (r.decode() if isinstance(r, bytes) else r
                                                         for r in data["failed_reasons"])))
    return feats, failed


def cosines(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> np.ndarray:
    assert sorted(a) == sorted(b)
    x, y = np.stack([a[r] for r in sorted(a)]), np.stack([b[r] for r in sorted(a)])
    return (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)


def test_every_worker_has_its_own_gpu_named_as_nvidia_smi_names_it(listing: Path) -> None:
    import torch

    out = run(listing, "all", "--gpus", "all", "--precision", "auto")
    summary = json.loads((out / "summary.json").read_text())
    uuids = [s["device_uuid"] for s in summary["shards"]]
    smi = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True, text=True,
                         check=True).stdout.split()
    assert len(uuids) == n_gpus() and len(set(uuids)) == len(uuids) and set(uuids) <= set(smi), (uuids, smi)
    for shard in summary["shards"]:  # shard i ran on cuda:i, the i-th GPU torch sees here
        index = int(shard["device"].split(":")[1])
        assert shard["device_uuid"] == nvidia_uuid(torch.cuda.get_device_properties(index).uuid)
        progress = json.loads((out / "shards" / f"{shard['shard']}.progress.json").read_text())
        assert progress["device_uuid"] == shard["device_uuid"] and progress["state"] == "complete"


def test_a_gpu_run_gives_the_cpu_run_vectors(listing: Path) -> None:
    import torch

    gpus = "0-1" if n_gpus() >= 2 else "0"
    gpu, failed_gpu = vectors(run(listing, "gpu", "--gpus", gpus, "--precision", "auto"))
    cpu, failed_cpu = vectors(run(listing, "cpu", "--gpus", "cpu", "--precision", "fp32"))
    assert failed_gpu.keys() == failed_cpu.keys() == {40}
    cos = cosines(gpu, cpu)
    bf16 = all(torch.cuda.get_device_capability(i) >= (8, 0) for i in range(min(2, n_gpus())))
    assert json.loads((listing.parent / "gpu" / "manifest.json").read_text())["model"]["precision"] == \
        ("bf16" if bf16 else "fp16")
    assert cos.min() >= 0.999, f"min cosine {cos.min():.5f} (mean {cos.mean():.5f})"


def test_decode_gpu_gives_the_cpu_decoder_vectors(listing: Path) -> None:
    nvjpeg, failed = vectors(run(listing, "nvjpeg", "--gpus", "0", "--precision", "fp32", "--decode", "gpu"))
    fast, _ = vectors(run(listing, "fast", "--gpus", "0", "--precision", "fp32", "--decode", "fast"))
    cos = cosines(nvjpeg, fast)
    assert set(failed) == {40} and cos.min() >= 0.99, f"min cosine {cos.min():.5f} (mean {cos.mean():.5f})"


def test_merge_on_a_gpu(listing: Path) -> None:
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("faiss is the CPU build here: `make install GPU=1` installs the GPU build")
    out = run(listing, "gpu", "--gpus", "0-1" if n_gpus() >= 2 else "0", "--precision", "auto")
    cli("merge", str(out), "--gpu", "--index-spec", "IVF4,Flat", check=True)
    cli("verify", str(out), check=True)
    index = faiss.read_index(str(out / "index" / "index.faiss"))
    feats, _ = vectors(out)
    rows = sorted(feats)
    faiss.extract_index_ivf(index).nprobe = 4
    _, ids = index.search(np.stack([feats[r] for r in rows]), 1)
    assert (ids[:, 0] == np.array(rows)).mean() >= 0.95

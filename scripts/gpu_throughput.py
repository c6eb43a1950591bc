"""One throughput line for `make gpu-check`: `featshard run` with ResNet-50 (random weights: speed does not depend
on them) over every GPU, on synthetic photo-like JPEGs, 500 x 375 (decode-bound or model-bound: the verdict says).

Usage: python scripts/gpu_throughput.py [--images N] [--model NAME] [--batch-size B]"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _save(args: tuple[int, str]) -> str:
    from helpers import photo

    i, path = args
    photo(i, 500, 375).save(path, quality=90)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=6000, help="rows to extract (default 6000)")
    parser.add_argument("--distinct", type=int, default=600, help="distinct files, repeated (default 600)")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--gpus", default="all", help="`run --gpus` (default all; cpu:N to try the script on a CPU)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="featshard-throughput-") as tmp:
        root = Path(tmp)
        (root / "imgs").mkdir()
        t = time.monotonic()
        with ProcessPoolExecutor() as pool:
            files = list(pool.map(_save, [(i, str(root / "imgs" / f"{i:05d}.jpg")) for i in range(args.distinct)]))
        made = time.monotonic() - t
        (root / "list.txt").write_text("".join(f"{files[i % len(files)]}\n" for i in range(args.images)))
        cmd = [sys.executable, "-m", "featshard", "run", "--input", str(root / "list.txt"), "--out", str(root / "run"),
               "--model", args.model, "--weights", "none", "--gpus", args.gpus]
        if args.batch_size:
            cmd += ["--batch-size", str(args.batch_size)]
        t = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.monotonic() - t
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        s = json.loads((root / "run" / "summary.json").read_text())
        devices = sorted({f"{e['device']}={e.get('device_name', '')}" for e in s["shards"]})
        steady = sum(e["images_per_s"] for e in s["shards"])
        print(f"throughput: {args.model}, {s['ok']} images on {len(devices)} device(s) ({', '.join(devices)}): "
              f"{s['images_per_s']:.0f} images/s in the workers, {steady:.0f} summed per shard, "
              f"{s['ok'] / wall:.0f} for the whole command ({wall:.1f} s, start-up included; {made:.0f} s to make "
              f"the images); {s['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

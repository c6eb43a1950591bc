"""Extract features with your own fine-tuned weights: `featshard run --weights PATH`.

    python examples/finetuned_checkpoint.py --input LIST_OR_DIR --out DIR [--model mobilenet_v2]
        [--base-weights PATH] [--classes 3] [--steps 3] [--gpus SPEC]

What a fine-tuning script leaves behind is mimicked here: the model (optionally started from `--base-weights`, e.g.
the ImageNet file `make install` puts in .venv) gets a new classifier head with `--classes` outputs and is trained for
a few SGD steps on the input images, then saved as a training checkpoint
`{"epoch": ..., "model_state_dict": ..., "optimizer_state_dict": ...}`. featshard reads that file (a plain state_dict,
a checkpoint dict holding one under state_dict / model_state_dict / model, a DataParallel `module.` prefix or a whole
pickled model all work), sizes the classifier from it, and extracts the pooled features before the classifier.
Labels come from each image's parent folder (ImageFolder layout); with a single folder they alternate.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
import torchvision
from PIL import Image


def image_paths(source: Path) -> list[Path]:
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    lines = [ln.strip() for ln in source.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return [p if p.is_absolute() else source.parent / p for p in map(Path, lines)]


def fine_tune(model_name: str, base: str | None, paths: list[Path], classes: int, steps: int) -> dict:
    """A few SGD steps with a fresh `classes`-way head; returns the checkpoint dict a training script would save."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None)
    if base:
        model.load_state_dict(torch.load(base, map_location="cpu", weights_only=True))
    head_name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    parent = model.get_submodule(head_name.rpartition(".")[0]) if "." in head_name else model
    setattr(parent, head_name.rpartition(".")[2], torch.nn.Linear(head.in_features, classes))
    prep = torchvision.models.get_model_weights(model_name).DEFAULT.transforms()
    folders = sorted({p.parent.name for p in paths})
    labels = [folders.index(p.parent.name) % classes if len(folders) > 1 else i % classes
              for i, p in enumerate(paths)]
    batch = torch.stack([prep(Image.open(p).convert("RGB")) for p in paths])
    target = torch.tensor(labels)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(batch), target)
        loss.backward()
        optimizer.step()
        print(f"step {step + 1}/{steps}: loss {loss.item():.4f}")
    return {"epoch": steps, "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()}


def featshard(*argv: str) -> None:
    cmd = [sys.executable, "-m", "featshard", *argv]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="list file or folder of images")
    parser.add_argument("--out", type=Path, required=True, help="folder for the checkpoint and the run")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--base-weights", default=None, help="state_dict to start from (default: random init)")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-train-images", type=int, default=32)
    parser.add_argument("--gpus", default=None)
    args = parser.parse_args()

    paths = image_paths(args.input)
    checkpoint = fine_tune(args.model, args.base_weights, paths[:args.max_train_images], args.classes, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / f"{args.model}-finetuned.pt"
    torch.save(checkpoint, ckpt)
    print(f"saved {ckpt}")

    run = args.out / "run"
    gpus = ["--gpus", args.gpus] if args.gpus else []
    featshard("run", "--input", str(args.input), "--out", str(run), "--model", args.model,
              "--weights", str(ckpt), *gpus)
    featshard("merge", str(run))
    featshard("search", str(run), "--image", str(paths[0]), "-k", "3")


if __name__ == "__main__":
    main()

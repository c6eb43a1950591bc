#!/usr/bin/env bash
# `make gpu-check`: what a machine with GPUs must show, in under 10 minutes (a 1 x H200 / 8 x H100 node).
#   1. featshard doctor (torch/CUDA/driver/faiss facts; its problems are printed, not fatal here)
#   2. the `gpu` test set: distinct devices per worker with UUIDs matching nvidia-smi, no CUDA in the coordinator,
#      a GPU run (2 GPUs where there are 2) equals a CPU run (cos >= 0.999 with bf16), --decode gpu fidelity,
#      the merge on a GPU (skipped with a CPU faiss: make install GPU=1), nvjpeg geometry
#   3. one throughput line: ResNet-50 over every GPU (scripts/gpu_throughput.py)
# Usage: bash scripts/gpu-check.sh [PYTHON]   (exit status: the first failing step's)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
step() { printf '\n==== %s  [%ss]\n' "$1" "$SECONDS"; }

step "featshard doctor"
"$PY" -m featshard doctor || echo "(doctor found problems: see above; going on)"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu-check: torch sees no GPU (see doctor)")'

step "gpu tests"
timeout 420 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/

step "throughput"
timeout 150 "$PY" scripts/gpu_throughput.py

step "gpu-check passed"

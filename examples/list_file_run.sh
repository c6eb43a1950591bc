#!/usr/bin/env bash
# A list-file run end to end: extract features, build the index, check every row, search.
#
#   examples/list_file_run.sh LIST OUT [QUERY_IMAGE ...]
#
# LIST has one image path per line (relative paths resolve against LIST's folder; blank lines and # comments are
# skipped). Without QUERY_IMAGE the first image of the list is the query. Settings through the environment:
#   MODEL (default resnet50)  WEIGHTS (DEFAULT | none | PATH, default DEFAULT)  GPUS (default: all GPUs, else cpu)
#   FEATSHARD (the command, default `featshard`; e.g. ".venv/bin/python -m featshard")
# e.g. MODEL=mobilenet_v2 WEIGHTS=/path/mobilenet_v2-b0353104.pth examples/list_file_run.sh photos.txt runs/photos
set -euo pipefail

list=${1:?usage: $0 LIST OUT [QUERY_IMAGE ...]}
out=${2:?usage: $0 LIST OUT [QUERY_IMAGE ...]}
shift 2
read -r -a featshard <<< "${FEATSHARD:-featshard}"

queries=("$@")
if [[ ${#queries[@]} == 0 ]]; then
    first=$(grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$list" | head -n 1)
    [[ $first == /* ]] || first="$(dirname "$list")/$first"
    queries=("$first")
fi

gpus=()
[[ -n ${GPUS:-} ]] && gpus=(--gpus "$GPUS")

# 1. features into $out/shards/*.h5 (one shard per device; rerun the same command to resume after a crash)
"${featshard[@]}" run --input "$list" --out "$out" --model "${MODEL:-resnet50}" --weights "${WEIGHTS:-DEFAULT}" "${gpus[@]}"
# 2. one faiss index over all shards: $out/index/index.faiss (ids = row numbers in the list)
"${featshard[@]}" merge "$out"
# 3. prove every input row is in exactly one shard (a vector or a recorded failure) and in the index
"${featshard[@]}" verify "$out"
# 4. the nearest images of each query, extracted with the run's own model and preprocessing
args=()
for q in "${queries[@]}"; do args+=(--image "$q"); done
"${featshard[@]}" search "$out" "${args[@]}" -k 5

#!/bin/bash
# Cache slice features on all GPUs of a node (or several nodes) with torchrun: rank r of world size n
# caches every n-th subject into STORE.shard-<r>-of-<n>.h5 on GPU LOCAL_RANK; then merge.
#
#   scripts/torchrun_cache.sh 4 cohort.csv timm/vit_small_patch14_dinov2 hub feats.h5 --planes axial
#   slice2vol cache merge --store feats.h5 --manifest cohort.csv
#
# No process group is created: shards are independent, so one crashed rank can be rerun alone with
# `slice2vol cache ... --shard r/n` and it will skip what that rank already committed. Ranks run with
# --allow-failures: torchrun tears down every rank when one exits non-zero, so a rank whose only
# problem is a few unreadable subjects must not stop the others (merge --manifest lists them).
# Several nodes: replace --standalone with --nnodes N --node-rank K --rdzv-endpoint HOST:PORT.
set -euo pipefail
NPROC=${1:?GPUs per node}
MANIFEST=${2:?manifest.csv}
ENCODER=${3:?encoder key}
WEIGHTS=${4:-hub}
STORE=${5:-features.h5}
shift $(( $# < 5 ? $# : 5 ))
exec torchrun --standalone --nproc-per-node "$NPROC" -m slice2vol.cli cache \
    --manifest "$MANIFEST" --encoder "$ENCODER" --weights "$WEIGHTS" --store "$STORE" \
    --device cuda --workers 4 --batch-size 128 --no-progress --allow-failures "$@"

#!/bin/bash
# Cache slice features of a cohort with a SLURM array: one shard per task, then one merge job.
#
#   sbatch --array=0-7 scripts/slurm_cache.sh cohort.csv timm/resnet18 hub feats.h5
#   # when all tasks are done (or: sbatch --dependency=afterok:<jobid> --wrap "...merge..."):
#   slice2vol cache merge feats.h5 feats.shard-*-of-8.h5
#
# Each task reads SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (and _MIN, so --array=1-8 works too),
# caches every n-th subject into feats.shard-<i>-of-<n>.h5, and can simply be resubmitted after a
# pre-emption or time limit: completed subjects are skipped. Exit status 1 means some subjects failed
# (listed in the log and recorded in the shard's history); the others are cached.
#SBATCH --job-name=s2v-cache
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail
MANIFEST=${1:?manifest.csv}
ENCODER=${2:?encoder key, e.g. timm/resnet18}
WEIGHTS=${3:-hub}
OUT=${4:-features.h5}
shift $(( $# < 4 ? $# : 4 ))
# Offline compute nodes: pass a local checkpoint as WEIGHTS, or pre-fill the HF cache and export
# HF_HUB_OFFLINE=1. On parallel filesystems without flock support: export HDF5_USE_FILE_LOCKING=FALSE.
WORKERS=$(( ${SLURM_CPUS_PER_TASK:-4} > 1 ? ${SLURM_CPUS_PER_TASK:-4} - 1 : 1 ))
exec slice2vol cache --manifest "$MANIFEST" --encoder "$ENCODER" --weights "$WEIGHTS" --out "$OUT" \
    --device cuda --workers "$WORKERS" --batch-size 128 --no-progress "$@"

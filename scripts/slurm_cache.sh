#!/bin/bash
# One shard of a slice-feature caching job, as a task of a SLURM array. Submit the whole job (array +
# merge step, log folder created) with scripts/slurm_submit.sh; by hand:
#
#   mkdir -p logs
#   sbatch --array=0-7 --output=logs/%x-%A_%a.out scripts/slurm_cache.sh 8 cohort.csv timm/resnet18 hub feats.h5
#   sbatch --array=3   --output=logs/%x-%A_%a.out scripts/slurm_cache.sh 8 ...   # rerun shard 3 of 8 only
#   slice2vol cache merge --store feats.h5 --manifest cohort.csv                # after all tasks
#
# The first argument is the number of shards N; task SLURM_ARRAY_TASK_ID caches shard
# "$SLURM_ARRAY_TASK_ID/N" into feats.shard-<i>-of-<N>.h5. The array spec only says which shards run:
# any spec works (--array=0-7, --array=3, --array=0-6:2 with N=7, --array=1,5,7), and a task id >= N
# is refused. A resubmitted task skips what its shard already holds (and recomputes damaged subjects
# or changed inputs). Subjects that fail are listed in the log and recorded in the shard's history;
# --allow-failures keeps the task's exit status 0 for them, so a merge step with
# --dependency=afterok is not blocked; `cache merge --manifest` then reports them. A task that crashes
# exits non-zero and records no finished job, and the merge refuses its shard.
#SBATCH --job-name=s2v-cache
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --requeue
set -euo pipefail
SHARDS=${1:?usage: slurm_cache.sh N_SHARDS MANIFEST ENCODER [WEIGHTS] [STORE] [cache options...]}
MANIFEST=${2:?manifest.csv}
ENCODER=${3:?encoder key, e.g. timm/resnet18}
WEIGHTS=${4:-hub}
STORE=${5:-features.h5}
shift $(( $# < 5 ? $# : 5 ))
if ! [[ "$SHARDS" =~ ^[1-9][0-9]*$ ]]; then
    echo "slurm_cache.sh: the first argument is the number of shards (a positive integer), got '$SHARDS'" >&2
    exit 2
fi
TASK=${SLURM_ARRAY_TASK_ID:-}
if [[ -z "$TASK" ]]; then
    echo "slurm_cache.sh: SLURM_ARRAY_TASK_ID is not set: submit with sbatch --array=0-$((SHARDS - 1))" >&2
    exit 2
fi
if (( TASK >= SHARDS )); then
    echo "slurm_cache.sh: array task $TASK but only $SHARDS shard(s) (ids 0-$((SHARDS - 1)))" >&2
    exit 2
fi
# Offline compute nodes: pass a local checkpoint as WEIGHTS, or pre-fill the HF cache and export
# HF_HUB_OFFLINE=1. On parallel filesystems without flock support: export HDF5_USE_FILE_LOCKING=FALSE.
WORKERS=$(( ${SLURM_CPUS_PER_TASK:-4} > 1 ? ${SLURM_CPUS_PER_TASK:-4} - 1 : 1 ))
exec slice2vol cache --manifest "$MANIFEST" --encoder "$ENCODER" --weights "$WEIGHTS" --store "$STORE" \
    --shard "$TASK/$SHARDS" --device auto --workers "$WORKERS" --batch-size 128 --no-progress \
    --allow-failures "$@"

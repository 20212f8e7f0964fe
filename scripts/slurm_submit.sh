#!/bin/bash
# Submits a whole sharded caching job to SLURM: the log folder, an array of N shard tasks
# (scripts/slurm_cache.sh) and a merge step that runs when the array has ended.
#
#   scripts/slurm_submit.sh 8 cohort.csv timm/resnet18 hub feats.h5 --planes axial --stride 2
#   S2V_ARRAY=3 scripts/slurm_submit.sh 8 cohort.csv ...     # rerun shard 3 only, then merge again
#
# Environment: S2V_LOGS (log folder, default logs), S2V_ARRAY (array spec, default 0-(N-1)),
# S2V_SBATCH (extra sbatch options for both jobs, e.g. "--partition=gpu --account=abc").
# The merge step uses --dependency=afterany: it runs even when a task crashed, and then refuses with a
# line naming the missing or unfinished shard (resubmit that task with S2V_ARRAY=i). Its log reports
# which manifest subjects the merged store covers; exit 1 when some failed.
set -euo pipefail
SHARDS=${1:?usage: slurm_submit.sh N_SHARDS MANIFEST ENCODER [WEIGHTS] [STORE] [cache options...]}
MANIFEST=${2:?manifest.csv}
ENCODER=${3:?encoder key}
WEIGHTS=${4:-hub}
STORE=${5:-features.h5}
shift $(( $# < 5 ? $# : 5 ))
if ! [[ "$SHARDS" =~ ^[1-9][0-9]*$ ]]; then
    echo "slurm_submit.sh: the first argument is the number of shards (a positive integer), got '$SHARDS'" >&2
    exit 2
fi
LOGS=${S2V_LOGS:-logs}
ARRAY=${S2V_ARRAY:-0-$((SHARDS - 1))}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$LOGS"  # SLURM opens --output before the job starts: the folder must exist at submission
# shellcheck disable=SC2086
JOB=$(sbatch --parsable ${S2V_SBATCH:-} --array="$ARRAY" --output="$LOGS/%x-%A_%a.out" \
    "$HERE/slurm_cache.sh" "$SHARDS" "$MANIFEST" "$ENCODER" "$WEIGHTS" "$STORE" "$@")
JOB=${JOB%%;*}  # "jobid;cluster" on federated clusters
MERGE_CMD=$(printf 'slice2vol cache merge --store %q --manifest %q' "$STORE" "$MANIFEST")
# shellcheck disable=SC2086
MERGE=$(sbatch --parsable ${S2V_SBATCH:-} --dependency="afterany:$JOB" --job-name=s2v-merge \
    --output="$LOGS/%x-%j.out" --wrap "$MERGE_CMD")
echo "submitted caching array $JOB (tasks $ARRAY of $SHARDS shards) and merge job ${MERGE%%;*}; logs in $LOGS/"

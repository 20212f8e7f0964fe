#!/bin/bash
# Pretrain (or fine-tune) with DistributedDataParallel on every GPU of one node, or of several nodes
# under SLURM. Arguments after the script are passed to `slice2vol pretrain` (or finetune) unchanged.
#
#   # one node, all its GPUs:
#   scripts/torchrun_pretrain.sh --config configs/ssl/simclr_gpu.yaml --manifest cohort.csv --out runs/simclr3d \
#       data.cache_dir=/scratch/$USER/volumes
#   # SLURM, 2 nodes x 4 GPUs (one torchrun per node, rendezvous on the first node):
#   sbatch --nodes 2 --gres gpu:4 scripts/torchrun_pretrain.sh --config ... --manifest ... --out ...
#   # fine-tuning instead:      S2V_COMMAND=finetune scripts/torchrun_pretrain.sh --config configs/finetune/...
#   # CPU processes (gloo):     NPROC_PER_NODE=2 scripts/torchrun_pretrain.sh ... --device cpu
#
# Each rank prepares its share of the volumes into data.cache_dir (default OUT/volumes), which must be
# on a file system every node sees. Rank 0 writes OUT/last every train.checkpoint_every steps; a
# requeued or resubmitted job resumes from it (same OUT, same config, same subjects). The global batch
# is train.batch_size x train.accumulate x processes: keep it when changing the number of GPUs.
#SBATCH --job-name=s2v-pretrain
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=32
#SBATCH --mem=128G
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
COMMAND=${S2V_COMMAND:-pretrain}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        # the GPUs this job may use (SLURM without device cgroups sets only this; empty: none), where
        # nvidia-smi lists them all
        NPROC_PER_NODE=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true)
    else
        NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    fi
    [ "${NPROC_PER_NODE:-0}" -ge 1 ] || NPROC_PER_NODE=1
fi
# Divide the cores of a node between its processes (torchrun would set 1 thread each otherwise);
# DataLoader workers run single-threaded on top (data.num_workers, default: cores per GPU - 1).
CPUS=${SLURM_CPUS_PER_TASK:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS / NPROC_PER_NODE > 0 ? CPUS / NPROC_PER_NODE : 1 ))}
# Parallel file systems without flock support: export HDF5_USE_FILE_LOCKING=FALSE before submitting.
if [ -n "${SLURM_JOB_ID:-}" ] && [ "${SLURM_NNODES:-1}" -gt 1 ]; then
    HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    exec srun --kill-on-bad-exit=1 torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "$NPROC_PER_NODE" \
        --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$HEAD:${MASTER_PORT:-29500}" \
        -m slice2vol.cli "$COMMAND" --no-progress "$@"
fi
exec torchrun --standalone --nproc-per-node "$NPROC_PER_NODE" -m slice2vol.cli "$COMMAND" --no-progress "$@"

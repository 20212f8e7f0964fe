"""DistributedDataParallel plumbing shared by ``pretrain`` and ``finetune`` (torchrun, SLURM, one process).

A job is distributed when it is started by ``torchrun`` (or anything that sets the same variables:
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); otherwise every helper
here degrades to the single-process case, so the training code has one path. The backend is NCCL
when the job trains on CUDA, gloo otherwise (CPU tests spawn two gloo processes).

Conventions the trainers follow:

* rank 0 alone writes checkpoints, metrics and plots; every rank waits at a barrier afterwards so a
  resumed or evaluated checkpoint is complete on disk;
* every rank runs the same number of optimiser steps with the same per-rank batch, so the averaged
  gradient of a step equals the gradient of one process on the concatenated global batch;
* CPU threads are divided between the processes of a node (``torchrun`` sets ``OMP_NUM_THREADS=1``
  when it starts several; an explicit ``OMP_NUM_THREADS`` is always respected).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 .. world_size - 1).
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        local_world_size: processes on this node (divides the CPU cores).
        initialized_here: this module created the process group (and destroys it in :func:`cleanup`).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_distributed(device_type: str = "cpu", *, timeout_s: float = 1800.0) -> DistEnv:
    """Joins the process group torchrun described in the environment (a no-op for one process).

    Args:
        device_type: ``cuda`` selects NCCL (and sets the current device to ``LOCAL_RANK``), anything
            else gloo.
        timeout_s: collective timeout (a rank that died makes the others fail instead of hanging).

    Returns:
        The :class:`DistEnv` of this process.
    """
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                       int(os.environ.get("LOCAL_WORLD_SIZE", 1)), False)
    world = env_world_size()
    if world <= 1:
        return DistEnv()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {missing} are not set: start distributed jobs with torchrun "
                           "(scripts/torchrun_pretrain.sh)")
    from datetime import timedelta

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    env = DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                  True)
    log.info("joined %s process group: rank %d of %d (local %d)", backend, env.rank, env.world_size, local_rank)
    return env


def cleanup(env: DistEnv) -> None:
    """Destroys the process group if :func:`init_distributed` created it."""
    if env.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_mean(values: Sequence[float], env: DistEnv, device: torch.device | str = "cpu") -> list[float]:
    """Means of per-rank scalars over all ranks (the values themselves for one process)."""
    if not env.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / env.world_size).tolist()


def all_reduce_max(values: Sequence[float], env: DistEnv, device: torch.device | str = "cpu") -> list[float]:
    """Maxima of per-rank scalars over all ranks (e.g. a 'loss is not finite' flag)."""
    if not env.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """Rank ``src``'s Python object on every rank (plain JSON-like data only)."""
    if not env.distributed:
        return obj
    box = [obj if env.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any, env: DistEnv) -> list:
    """Every rank's Python object, in rank order (``[obj]`` for one process)."""
    if not env.distributed:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenates (B, ...) tensors of all ranks along dim 0, keeping the autograd graph.

    The backward pass sums each rank's gradient slices back to their owner, so a loss computed by
    every rank on the gathered batch, then averaged by DDP, has the gradient of one process computing
    it on the concatenated batch (SimCLR negatives from every rank). Identity for one process.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherLayer.apply(x.contiguous())


class _GatherLayer(torch.autograd.Function):
    """all_gather with a backward pass (the layer solo-learn and lightly use; every rank's batch has the
    same size). Backward: the gradients of all ranks are summed, each rank keeps its own rows. Written
    on the plain collectives because gloo has no reduce_scatter for torch's functional version."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def available_cores() -> int:
    """CPU cores this process may run on (affinity mask, e.g. a SLURM allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def configure_threads(env: DistEnv) -> int:
    """Divides the node's cores between its processes; returns the intra-op thread count in use.

    An explicit ``OMP_NUM_THREADS`` wins (torchrun sets 1 when it starts several processes; set it
    to ``cores / processes`` for CPU training).
    """
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    threads = max(1, available_cores() // max(1, env.local_world_size))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


def rank_device(name: str, env: DistEnv) -> torch.device:
    """The training device for ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``); under torchrun on CUDA
    the GPU of this process's local rank. An explicit other index is refused in one line."""
    from slice2vol.runtime import checked_device

    device = torch.device(checked_device(name, "train.device"))
    if device.type == "cuda" and env.distributed:
        if device.index is not None and device.index != env.local_rank:
            # every rank would build its DDP replica on that one GPU: NCCL's "duplicate GPU" or a hang
            raise ValueError(f"train.device={name} under torchrun: each process trains on the GPU of its "
                             f"LOCAL_RANK ({env.local_rank} here); give cuda without an index")
        device = torch.device("cuda", env.local_rank)
    return device


def default_num_workers(device_type: str, env: DistEnv) -> int:
    """DataLoader workers per process that leave the compute threads their cores.

    On CUDA the model runs on the GPU, so all but one core of this process's share load data (up to
    8). On CPU the model's intra-op threads already use every core of the share: loading runs in
    the training process (0 workers) unless the share has more than 4 cores, then one worker.
    """
    share = max(1, available_cores() // max(1, env.local_world_size))
    if device_type == "cuda":
        return max(1, min(8, share - 1))
    return 1 if share > 4 else 0


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (the module itself otherwise)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model

"""DistributedDataParallel on CPU: two gloo processes equal one process with the same global batch.

The workers are spawned with torch.multiprocessing and given the environment torchrun would set, so
they go through the same code path as ``torchrun ... slice2vol pretrain``. The CI test kills the DDP
run after step 3 (last checkpoint: step 2) and resumes it in the same two processes on a fresh process
group (one spawn: starting interpreters is most of the cost); the slow test resumes with a new pair of
processes, as a requeued job does.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from slice2vol.ssl.trainer import load_checkpoint, pretrain
from tests.ssl.conftest import tiny_config

GLOBAL_BATCH = 4


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]  # held together: n distinct ports
    finally:
        for s in socks:
            s.close()


def _config(world: int, **train):
    # autoencoder: its step draws no randomness, so the global batch fully determines the loss;
    # GroupNorm backbone: no batch statistics that would differ per rank on CPU (no SyncBatchNorm there).
    # Two processes run micro-batches of 1 with 2 accumulation steps: 1 x 2 x 2 = the single run's 4.
    split = {"batch_size": 1, "accumulate": 2} if world == 2 else {"batch_size": GLOBAL_BATCH}
    params = {"steps": 4, "checkpoint_every": 2, "log_every": 1, "warmup_steps": 1, "grad_clip": 0.5,
              "count_flops": True, **split, **train}
    cfg = tiny_config("autoencoder", 3, **params)
    cfg.data.volume_size, cfg.data.crop_size = (24, 24, 24), (16, 16, 16)
    return cfg


def _bank():
    from slice2vol.ssl.data import VolumeBank

    return VolumeBank.synthetic(4, (24, 24, 24), seed=3)


def _worker(rank: int, world: int, ports: list[int], out: str, stop_after: int | None, gather_check: bool,
            resume_here: bool = False) -> None:
    """One rank: pretrain (stopped after ``stop_after``), optionally resume in this process on ``ports[1]``,
    optionally the gather check on ``ports[2]``; rank 0 writes ``result.json``."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(ports[0]),
                       "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    run = os.path.join(out, "run")
    result = pretrain(_config(world), run, bank=_bank(), progress=False, plot=False, stop_after=stop_after)
    record = {"first_step": result.step}
    if resume_here:  # "killed": only last/ survives; a fresh process group resumes from it
        with open(os.path.join(run, "last", "meta.json")) as fh:
            record["checkpoint_step_at_kill"] = json.load(fh)["step"]
        os.environ["MASTER_PORT"] = str(ports[1])
        result = pretrain(_config(world), run, bank=_bank(), progress=False, plot=False)
    if rank == 0:
        with open(os.path.join(out, "result.json"), "w") as fh:
            json.dump({**record, "step": result.step, "history": result.history, "cost": result.cost}, fh)
    if gather_check:
        _gather_check(rank, world, ports[2], out)


def _gather_check(rank: int, world: int, port: int, out: str) -> None:
    """NT-Xent on features gathered from both ranks: same loss as one process, gradient world x larger
    per rank (DDP's averaging then gives exactly the single-process gradient)."""
    import torch.distributed as dist

    from slice2vol.ssl.distributed import gather_with_grad
    from slice2vol.ssl.losses import nt_xent

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    a, b = z1[rows].clone().requires_grad_(True), z2[rows].clone().requires_grad_(True)
    loss = nt_xent(gather_with_grad(a), gather_with_grad(b), 0.2)
    loss.backward()
    torch.save({"loss": loss.detach(), "ga": a.grad, "gb": b.grad}, os.path.join(out, f"gather{rank}.pt"))
    dist.destroy_process_group()


def _spawn(out, stop_after=None, gather_check=False, resume_here=False, world=2):
    mp.spawn(_worker, args=(world, _free_ports(3), str(out), stop_after, gather_check, resume_here), nprocs=world,
             join=True)
    return json.loads((out / "result.json").read_text())


def _params(run_dir):
    model, _, _ = load_checkpoint(run_dir)
    return model.state_dict()


def _assert_same_training(tmp_path, single, resumed) -> None:
    """The resumed 2-process run (``tmp_path/ddp/run``) trained exactly like the 1-process one."""
    losses_single = [r["loss"] for r in single.history]
    losses_ddp = [r["loss"] for r in resumed["history"]]
    assert [r["step"] for r in resumed["history"]] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor(losses_ddp), torch.tensor(losses_single), rtol=1e-4, atol=1e-6)
    assert losses_single[-1] < losses_single[0]  # it trains, so equal parameters are not equal by accident
    a, b = _params(tmp_path / "single" / "run"), _params(tmp_path / "ddp" / "run")
    assert a.keys() == b.keys()
    # Adam divides each gradient element by its running RMS: for the few elements whose gradient is
    # ~0, float-rounding differences between one batch of 4 and 2 x 2 accumulated-and-averaged halves
    # become differences of up to a learning rate (sign flips). So: 99% of every tensor agrees to 1e-5,
    # and no element is further apart than lr; training moved the parameters far more than that.
    lr = _config(1).train.lr
    init = pretrain(_config(1, steps=0), tmp_path / "init", bank=_bank(), progress=False, plot=False)
    moved = [float((a[k] - v).abs().float().quantile(0.5)) for k, v in _params(init.out_dir).items()
             if v.is_floating_point() and v.numel() > 100]
    assert min(moved) > 1e-3
    for name in a:
        if not a[name].is_floating_point():
            continue
        diff = (b[name] - a[name]).abs().flatten().float()
        # in a tensor of a few elements (a bias of 8) the 99% quantile is its max, which the sign flips
        # above may legitimately move (seen with one thread per process): its median must agree instead
        assert float(diff.quantile(0.99 if diff.numel() >= 100 else 0.5)) < 1e-5, name
        assert float(diff.max()) < lr, name
    meta = json.loads((tmp_path / "ddp" / "run" / "last" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["total_steps"] == 4 and meta["step"] == 4
    # FLOPs of a global step do not depend on how it is split over processes
    assert resumed["cost"]["flops_per_step"] == pytest.approx(single.cost["flops_per_step"], rel=1e-6)


def _assert_gather(folder) -> None:
    from slice2vol.ssl.losses import nt_xent

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 16, generator=g).requires_grad_(True), torch.randn(8, 16, generator=g).requires_grad_(True)
    loss = nt_xent(z1, z2, 0.2)
    loss.backward()
    for rank in range(2):
        got = torch.load(folder / f"gather{rank}.pt", weights_only=True)
        rows = slice(rank * 4, rank * 4 + 4)
        torch.testing.assert_close(got["loss"], loss.detach())
        torch.testing.assert_close(got["ga"] / 2, z1.grad[rows])
        torch.testing.assert_close(got["gb"] / 2, z2.grad[rows])


def test_two_gloo_processes_equal_one_process_across_a_resume(tmp_path):
    single = pretrain(_config(1), tmp_path / "single" / "run", bank=_bank(), progress=False, plot=False)
    resumed = _spawn(tmp_path / "ddp", stop_after=3, gather_check=True, resume_here=True)
    assert resumed["first_step"] == 3 and resumed["checkpoint_step_at_kill"] == 2 and resumed["step"] == 4
    _assert_same_training(tmp_path, single, resumed)
    _assert_gather(tmp_path / "ddp")


@pytest.mark.slow
def test_two_gloo_processes_resumed_by_a_new_pair_of_processes(tmp_path):
    single = pretrain(_config(1), tmp_path / "single" / "run", bank=_bank(), progress=False, plot=False)
    # DDP, killed after step 3 (last checkpoint: step 2), then resumed to step 4 by a new pair of processes
    first = _spawn(tmp_path / "ddp", stop_after=3)
    assert first["first_step"] == 3
    assert json.loads((tmp_path / "ddp" / "run" / "last" / "meta.json").read_text())["step"] == 2
    resumed = _spawn(tmp_path / "ddp")
    assert resumed["step"] == 4
    _assert_same_training(tmp_path, single, resumed)


def test_each_rank_trains_on_its_own_gpu_and_another_explicit_index_is_refused(monkeypatch):
    """GPU review: an explicit train.device=cuda:N under torchrun put every rank's DDP replica on GPU N
    (NCCL 'duplicate GPU' or a hang). Device resolution only: no GPU is touched."""
    import torch

    from slice2vol import runtime
    from slice2vol.ssl import distributed
    from slice2vol.ssl.distributed import DistEnv

    monkeypatch.setattr(runtime, "checked_device", lambda name, source="--device": name)
    rank1 = DistEnv(rank=1, world_size=2, local_rank=1, local_world_size=2)
    assert distributed.rank_device("cuda", rank1) == torch.device("cuda", 1)
    assert distributed.rank_device("cuda:1", rank1) == torch.device("cuda", 1)
    assert distributed.rank_device("cpu", rank1) == torch.device("cpu")
    assert distributed.rank_device("cuda:0", DistEnv()) == torch.device("cuda", 0)  # one process: as asked
    with pytest.raises(ValueError, match=r"^train.device=cuda:0 under torchrun: each process trains on the GPU "
                                         r"of its LOCAL_RANK \(1 here\); give cuda without an index$"):
        distributed.rank_device("cuda:0", rank1)

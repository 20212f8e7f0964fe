"""Fine-tuning under DistributedDataParallel (two gloo processes) and resumption of a fine-tuning run."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from slice2vol.encoders import build_encoder
from slice2vol.finetune import FinetuneConfig, SupervisedObjective, setup_trainable, train_steps

TINY_VIT = dict(img_size=32, model_kwargs=dict(depth=2))
N_SUBJECTS, PER_SUBJECT = 4, 2


def _cfg(steps: int = 4, **train) -> FinetuneConfig:
    cfg = FinetuneConfig(encoder="timm/vit_small_patch16_224", encoder_kwargs=TINY_VIT, mode="last_blocks",
                         last_blocks=1, objective="supervised", label="sex")
    cfg.train.steps, cfg.train.lr, cfg.train.head_lr, cfg.train.device = steps, 1e-3, 1e-2, "cpu"
    cfg.data.slices_per_subject = PER_SUBJECT
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def _fixed_batch():
    g = torch.Generator().manual_seed(7)
    images = torch.rand(N_SUBJECTS * PER_SUBJECT, 1, 32, 32, generator=g)
    return images, torch.arange(N_SUBJECTS), torch.tensor([0, 1, 1, 0])


def _train(rank: int, world: int, out: str | None, env=None, steps: int = 4, **train):
    """Trains on this rank's share of one fixed global batch; returns (encoder, objective, losses)."""
    cfg = _cfg(steps, **train)
    torch.manual_seed(0)
    encoder = build_encoder(cfg.encoder, **cfg.encoder_kwargs)
    setup = setup_trainable(encoder.model, cfg)
    images, subjects, targets = _fixed_batch()
    objective = SupervisedObjective(encoder.info.embed_dim, cfg, targets.numpy(), "categorical", ["F", "M"])
    share = N_SUBJECTS // world
    mine = subjects[rank * share:(rank + 1) * share]
    rows = images.view(N_SUBJECTS, PER_SUBJECT, 1, 32, 32)[mine].flatten(0, 1)
    losses = train_steps(encoder, objective, None, cfg, setup["train_modules"], progress=False,
                         batch_fn=lambda g: objective.loss(encoder, rows, mine), out_dir=out, env=env)
    return encoder, objective, losses


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from slice2vol.ssl.distributed import cleanup, init_distributed

    env = init_distributed("cpu")
    encoder, objective, losses = _train(rank, world, None, env)
    if rank == 0:
        torch.save({"encoder": encoder.model.state_dict(), "objective": objective.state_dict()},
                   os.path.join(out, "ddp.pt"))
        with open(os.path.join(out, "losses.json"), "w") as fh:
            json.dump(losses, fh)
    cleanup(env)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    encoder, objective, losses = _train(0, 1, None)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    torch.testing.assert_close(torch.tensor(json.loads((tmp_path / "losses.json").read_text())),
                               torch.tensor(losses), rtol=1e-4, atol=1e-6)
    assert losses[-1] < losses[0]
    single = {**{f"encoder.{k}": v for k, v in encoder.model.state_dict().items()},
              **{f"objective.{k}": v for k, v in objective.state_dict().items()}}
    other = {**{f"encoder.{k}": v for k, v in ddp["encoder"].items()},
             **{f"objective.{k}": v for k, v in ddp["objective"].items()}}
    # Adam turns rounding noise of gradients that are ~0 into steps of up to lr: a third of attn.qkv.bias
    # (the key bias, which softmax ignores) has an exactly-zero gradient. So: medians agree tightly, no
    # element differs by more than lr, and the trained networks compute the same features.
    for name, value in single.items():
        if value.is_floating_point():
            diff = (other[name] - value).abs().flatten().float()
            assert float(diff.median()) < 1e-6 and float(diff.max()) < _cfg().train.lr, name
    images, _, _ = _fixed_batch()
    twin = build_encoder(_cfg().encoder, **TINY_VIT)
    setup_trainable(twin.model, _cfg())
    twin.model.load_state_dict(ddp["encoder"])
    with torch.no_grad():
        torch.testing.assert_close(twin.encode(images), encoder.encode(images), rtol=1e-4, atol=1e-4)


def test_resumed_finetuning_equals_an_uninterrupted_run(tmp_path):
    """4 steps straight == 2 steps (state saved every step), then a rerun asked for 4 steps."""
    enc_a, obj_a, losses_a = _train(0, 1, str(tmp_path / "a"), checkpoint_every=1)
    _train(0, 1, str(tmp_path / "b"), steps=2, checkpoint_every=1)
    assert json.loads((tmp_path / "b" / "train_state" / "state.json").read_text())["step"] == 2
    enc_b, obj_b, losses_b = _train(0, 1, str(tmp_path / "b"), checkpoint_every=1)
    assert losses_b == pytest.approx(losses_a, rel=1e-6) and len(losses_b) == 4
    for (name, a), b in zip(enc_a.model.state_dict().items(), enc_b.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # the refusal names the key that differs
    with pytest.raises(ValueError, match=r"another config \(train.lr 0.001 -> 0.5\); use another --out"):
        _train(0, 1, str(tmp_path / "b"), checkpoint_every=1, lr=0.5)

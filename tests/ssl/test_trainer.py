import json
import math

import pytest
import torch

from slice2vol.ssl import build_method
from slice2vol.ssl.config import TrainConfig
from slice2vol.ssl.data import make_dataset
from slice2vol.ssl.trainer import (cosine_with_warmup, load_checkpoint, pretrain, seed_everything, train)
from tests.ssl.conftest import tiny_config


# simclr: MONAI random states; mae: multinomial masks; rotation: labels. The others draw the same ways.
@pytest.mark.parametrize("method", ["simclr", "mae", "rotation",
                                    *[pytest.param(m, marks=pytest.mark.slow) for m in ("genesis", "jigsaw",
                                                                                        "autoencoder")]])
def test_killed_and_resumed_run_equals_uninterrupted_run(method, bank, tmp_path):
    """6 steps straight == 4 steps, killed (last checkpoint at 3), resumed to 6 — bit for bit on CPU."""
    cfg = tiny_config(method, 3, steps=6, checkpoint_every=3, deterministic=True, batch_size=2)
    straight = pretrain(cfg, tmp_path / "a", bank=bank, progress=False, plot=False)
    pretrain(cfg, tmp_path / "b", bank=bank, progress=False, stop_after=4, plot=False)
    assert json.loads((tmp_path / "b" / "last" / "meta.json").read_text())["step"] == 3
    resumed = pretrain(cfg, tmp_path / "b", bank=bank, progress=False, plot=False)
    assert straight.step == resumed.step == 6
    a, _, _ = load_checkpoint(tmp_path / "a")
    b, _, _ = load_checkpoint(tmp_path / "b")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert [r["step"] for r in resumed.history] == list(range(1, 7))
    assert resumed.history[-1]["loss"] == straight.history[-1]["loss"]


def test_checkpoint_files_are_safe_and_complete(bank, tmp_path):
    cfg = tiny_config("rotation", 3, steps=2, checkpoint_every=1)
    result = pretrain(cfg, tmp_path, bank=bank, progress=False)
    last = tmp_path / "last"
    state = torch.load(last / "train_state.pt", weights_only=True)  # tensors and plain values only
    assert state["step"] == 2 and {"optimizer", "scheduler", "rng"} <= set(state)
    meta = json.loads((last / "meta.json").read_text())
    assert meta["method"] == "rotation" and meta["embed_dim"] == 32 and meta["config"]["spatial_dims"] == 3
    from safetensors.torch import load_file

    model, cfg2, _ = load_checkpoint(last)
    assert set(load_file(str(last / "encoder.safetensors"))) == set(model.encoder.state_dict())
    assert cfg2 == cfg
    for f in ("metrics.csv", "metrics.json", "loss_curve.png", "config.json"):
        assert (tmp_path / f).stat().st_size > 0, f
    assert result.loss_curve == tmp_path / "loss_curve.png"
    assert {"step", "loss", "lr", "samples_per_s", "acc"} <= set(result.history[0])
    assert not (tmp_path / "last.tmp").exists()


def test_cosine_schedule_with_warmup_by_hand():
    f = cosine_with_warmup(TrainConfig(steps=12, warmup_steps=2, min_lr_ratio=0.0))
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(12) == pytest.approx(0.0, abs=1e-12)


class Halves:
    """Yields the two halves of a batch alternately (accumulation test)."""

    def __init__(self, batch):
        self.batch, self.i = batch, 0

    def sample(self, n):
        out = self.batch[self.i * n:(self.i + 1) * n]
        self.i = (self.i + 1) % (len(self.batch) // n)
        return out


def test_gradient_accumulation_equals_the_full_batch(bank, tmp_path):
    cfg_full = tiny_config("autoencoder", 2, steps=2, batch_size=4, grad_clip=0.0)
    cfg_acc = tiny_config("autoencoder", 2, steps=2, batch_size=2, accumulate=2, grad_clip=0.0)
    seed_everything(0)
    batch = make_dataset(bank, 2, cfg_full.data).sample(4)
    models = []
    for i, cfg in enumerate((cfg_full, cfg_acc)):
        seed_everything(0)
        model = build_method(cfg)
        train(model, Halves(batch), cfg, tmp_path / str(i),
              progress=False, plot=False)
        models.append(model)
    for pa, pb in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


def test_zero_steps_saves_the_random_initialisation(bank, tmp_path):
    cfg = tiny_config("rotation", 3, steps=0)
    result = pretrain(cfg, tmp_path, bank=bank, progress=False)
    model, _, meta = load_checkpoint(tmp_path)
    assert result.step == 0 and meta["step"] == 0
    seed_everything(cfg.train.seed)
    fresh = build_method(cfg)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name

"""Compute accounting: FLOPs per step against a hand count, budgets that fix the step count, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from slice2vol.ssl.base import SSLMethod
from slice2vol.ssl.compute import StepCost, count_step_flops, resolve_budget_steps
from slice2vol.ssl.config import TrainConfig
from slice2vol.ssl.export import list_checkpoints
from slice2vol.ssl.trainer import pretrain
from tests.ssl.conftest import tiny_config


class _TwoLinear(SSLMethod):
    """16 -> 8 -> 4 linear layers and a squared-output loss: FLOPs countable by hand."""

    def __init__(self) -> None:
        backbone = nn.Linear(16, 8)
        backbone.embed_dim = 8
        super().__init__(backbone, 2, 1, (4, 4))
        self.head = nn.Linear(8, 4, bias=False)

    def training_step(self, batch):
        return self.head(self.backbone(batch.flatten(1))).pow(2).mean(), {}


def test_flops_of_a_step_match_a_hand_count():
    batch = torch.randn(5, 1, 4, 4)
    cost = count_step_flops(_TwoLinear(), batch)
    b = 5
    # layer 1: forward 2*B*16*8, weight gradient 2*B*16*8 (the input needs no gradient)
    # layer 2: forward 2*B*8*4, input gradient 2*B*8*4, weight gradient 2*B*8*4
    expected = 2 * (2 * b * 16 * 8) + 3 * (2 * b * 8 * 4)
    assert cost.flops == expected and cost.flops_per_sample == expected / b
    assert cost.by_module == {"backbone": 2 * (2 * b * 16 * 8), "head": 3 * (2 * b * 8 * 4)}
    assert cost.uncounted_ops == [] and cost.unused == []


class _Attention(_TwoLinear):
    def training_step(self, batch):
        q = self.backbone(batch.flatten(1)).view(1, 1, -1, 8)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q).pow(2).mean(), {}


def test_uncounted_cpu_attention_and_unused_parameters_are_reported():
    cost = count_step_flops(_Attention(), torch.randn(5, 1, 4, 4))
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in cost.uncounted_ops
    assert cost.unused == ["head.weight"]  # DDP then needs find_unused_parameters


def test_counting_leaves_the_model_and_the_rng_untouched():
    model = _TwoLinear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    count_step_flops(model, torch.randn(5, 1, 4, 4))
    after_rng = torch.rand(1)
    torch.manual_seed(0)
    torch.randn(5, 1, 4, 4)
    assert torch.equal(after_rng, torch.rand(1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("budget, cost, steps", [
    ({"budget_flops": 1e9}, StepCost(3e8, 1.0), 3),
    ({"budget_flops": 3e8}, StepCost(3e8, 1.0), 1),
    ({"budget_device_hours": 0.5}, StepCost(1.0, 1.0, seconds=60.0), 30),
    ({}, StepCost(1.0, 1.0), None),
])
def test_budget_resolution_by_hand(budget, cost, steps):
    assert resolve_budget_steps(TrainConfig(**budget), cost) == steps


def test_budget_errors():
    with pytest.raises(ValueError, match="not both"):
        resolve_budget_steps(TrainConfig(budget_flops=1.0, budget_device_hours=1.0), StepCost(1.0, 1.0))
    with pytest.raises(ValueError, match="less than one optimiser step"):
        resolve_budget_steps(TrainConfig(budget_flops=1.0), StepCost(2.0, 1.0))


def test_2d_and_3d_runs_get_the_same_flop_budget(bank, tmp_path):
    """A FLOP budget buys different step counts for slices and crops, and both spend it."""
    results = {}
    for dims in (3, 2):
        cfg = tiny_config("autoencoder", dims, steps=1000, count_flops=True, warmup_steps=1, log_every=1)
        cfg.data.slice_size = (128, 128)
        probe = pretrain(cfg, tmp_path / f"probe{dims}", bank=bank, progress=False, plot=False, stop_after=1)
        per_step = probe.cost["flops_per_step"]
        cfg.train.budget_flops = 3.5 * (per_step if dims == 3 else results[3][1] / 3.5)
        result = pretrain(cfg, tmp_path / f"run{dims}", bank=bank, progress=False, plot=False)
        results[dims] = (result, cfg.train.budget_flops, per_step)
    (r3, budget, f3), (r2, budget2, f2) = results[3], results[2]
    assert budget == budget2 and f2 < f3  # a 128^2 slice step is cheaper than a 24^3 crop step
    assert r3.total_steps == r3.step == 3
    assert r2.total_steps == int(budget // f2) > r3.total_steps
    for r, f in ((r3, f3), (r2, f2)):
        assert r.total_steps * f <= budget < (r.total_steps + 1) * f
        meta = json.loads((r.out_dir / "last" / "meta.json").read_text())
        assert meta["compute"]["budget"]["resolved_steps"] == r.total_steps == meta["total_steps"]
        assert r.history[-1]["flops"] == pytest.approx(r.total_steps * f)
        assert {"step_time_s", "wall_s", "samples_per_s"} <= set(r.history[-1])
    # the schedule is laid out over the resolved steps (warm-up 1, then cosine over the other 2)
    assert [r["lr"] for r in r3.history] == pytest.approx([3e-3, 3e-3, 3e-3 * (0.01 + 0.99 * 0.5)])


def test_resumed_budget_run_keeps_its_resolved_steps(bank, tmp_path):
    cfg = tiny_config("rotation", 3, steps=1000, checkpoint_every=1, count_flops=True)
    probe = pretrain(tiny_config("rotation", 3, steps=1, count_flops=True), tmp_path / "p", bank=bank,
                     progress=False, plot=False)
    cfg.train.budget_flops = 3.5 * probe.cost["flops_per_step"]
    pretrain(cfg, tmp_path / "run", bank=bank, progress=False, plot=False, stop_after=2)
    done = pretrain(cfg, tmp_path / "run", bank=bank, progress=False, plot=False)
    assert done.step == done.total_steps == 3


def test_list_checkpoints_gives_every_kept_step(bank, tmp_path):
    cfg = tiny_config("rotation", 3, steps=5, checkpoint_every=2, keep_every=2)
    pretrain(cfg, tmp_path, bank=bank, progress=False, plot=False)
    found = list_checkpoints(tmp_path)
    assert [s for s, _ in found] == [2, 4, 5]
    assert found[-1][1] == tmp_path / "last" and found[0][1].name == "step_0000002"
    assert list_checkpoints(tmp_path / "nothing") == []

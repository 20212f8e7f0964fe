"""Compute accounting of a pretraining run: FLOPs and wall time per step, and compute budgets.

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` over one real training
step (forward and backward of the method on one micro-batch, on a copy of the model so the run
itself is untouched). What it counts: matrix multiplications, convolutions (and their backward),
and the CUDA scaled-dot-product attention kernels. What it misses, recorded per run in
``flops_uncounted_ops``:

* CPU attention kernels (``_scaled_dot_product_flash_attention_for_cpu``) and the
  ``nn.MultiheadAttention`` inference fast path (``_native_multi_head_attention``) — not registered
  in torch's FLOP table; MONAI's ViT blocks compute attention with explicit matmuls and are counted;
* element-wise work (norms, activations, the optimiser update) and data augmentation (MONAI
  transforms) except where it convolves (``RandGaussianSmooth``, counted at top level), all small
  next to the network's convolutions but not zero.

A budget (``train.budget_flops`` or ``train.budget_device_hours``) fixes the number of optimiser
steps before training starts, from the measured FLOPs (or seconds) per step, so a 2D run on slices
and a 3D run on crops of the same cohort get the same compute; the schedule (warm-up, cosine) is
laid out over the resolved steps.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

log = logging.getLogger(__name__)

#: heavy ops that FlopCounterMode does not count (their presence is recorded, their FLOPs are not)
UNCOUNTED_HEAVY_OPS = (
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._scaled_dot_product_flash_attention_for_cpu_backward",
    "aten._native_multi_head_attention",
    "aten._transformer_encoder_layer_fwd",
    "aten._scaled_dot_product_fused_attention_overrideable",
)


@dataclass
class StepCost:
    """Measured cost of one optimiser step.

    Attributes:
        flops: forward + backward FLOPs of one global optimiser step (all micro-batches, all ranks).
        flops_per_sample: ``flops`` / samples of the global batch.
        seconds: wall seconds of the timed step(s) on this machine (0 when not timed).
        uncounted_ops: heavy ops that ran but are not in torch's FLOP table.
        by_module: top-level module -> FLOPs of one micro-batch (which part of the method costs what).
        unused: trainable parameters that got no gradient (DDP then needs ``find_unused_parameters``).
    """

    flops: float
    flops_per_sample: float
    seconds: float = 0.0
    uncounted_ops: list[str] = field(default_factory=list)
    by_module: dict[str, float] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the names of the aten ops that run (to report the heavy ones FLOP counting misses)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket._qualified_op_name).replace("::", "."))
        return func(*args, **(kwargs or {}))


def count_step_flops(model: torch.nn.Module, batch: torch.Tensor,
                     step_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None) -> StepCost:
    """FLOPs of forward + backward of ``model.training_step(batch)`` on a copy of ``model``.

    The torch RNG state is restored afterwards, so counting does not change the run's randomness.

    Args:
        model: an :class:`~slice2vol.ssl.base.SSLMethod` (or anything ``step_fn`` accepts).
        batch: one micro-batch on the model's device.
        step_fn: ``(model, batch) -> scalar loss``; default ``model.training_step(batch)[0]``.

    Returns:
        :class:`StepCost` for this micro-batch (``flops_per_sample`` = flops / len(batch)), with the
        parameters the step left without gradient.
    """
    from torch.utils.flop_counter import FlopCounterMode

    step_fn = step_fn or (lambda m, b: m(b)[0])  # through __call__: module FLOPs are attributed by name
    probe = copy.deepcopy(model).train()
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    recorder = _OpRecorder()
    counter = FlopCounterMode(display=False)
    try:
        with counter, recorder:
            loss = step_fn(probe, batch)
            loss.backward()
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    flops = float(counter.get_total_flops())
    by_module = {}
    for name, counts in counter.get_flop_counts().items():
        if name.count(".") == 1 and name != "Global":  # direct children of the method
            by_module[name.split(".", 1)[1]] = float(sum(counts.values()))
    uncounted = sorted(op for op in recorder.ops if op in UNCOUNTED_HEAVY_OPS)
    if uncounted:
        log.warning("FLOP count misses %s (not in torch's FLOP table): the recorded FLOPs are a lower bound",
                    uncounted)
    unused = [n for n, p in probe.named_parameters() if p.requires_grad and p.grad is None]
    return StepCost(flops, flops / max(1, len(batch)), 0.0, uncounted, by_module, unused)


def time_step(model: torch.nn.Module, batch: torch.Tensor,
              step_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor], repeats: int = 3,
              device: torch.device | None = None) -> float:
    """Median wall seconds of forward + backward on a copy of ``model`` (the first, warm-up call dropped).

    The optimiser update is not included (it is small next to a convolutional step); the torch RNG
    state is restored afterwards.
    """
    probe = copy.deepcopy(model).train()
    timer = StepTimer(device or batch.device)
    rng = torch.get_rng_state()
    # the GPU's too: MAE masks and genesis permutations are drawn there, and a budgeted run's first
    # step would otherwise differ from the same run without the timing probe
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    times = []
    try:
        for _ in range(max(1, repeats) + 1):
            timer.begin()
            step_fn(probe, batch).backward()
            probe.zero_grad(set_to_none=True)
            times.append(timer.end())
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    times = sorted(times[1:])
    return times[len(times) // 2]


def resolve_budget_steps(train_cfg, cost: StepCost) -> int | None:
    """Optimiser steps that fit the run's budget, or ``None`` when the config sets none.

    ``budget_flops`` divides by the measured FLOPs of a global step; ``budget_device_hours`` by the
    measured seconds per step times the number of devices (``world_size`` already folded into
    ``cost.seconds`` as device-seconds).

    Raises:
        ValueError: both budgets set, or a budget smaller than one step.
    """
    flops_budget = float(getattr(train_cfg, "budget_flops", 0) or 0)
    hours_budget = float(getattr(train_cfg, "budget_device_hours", 0) or 0)
    if flops_budget and hours_budget:
        raise ValueError("set train.budget_flops or train.budget_device_hours, not both")
    if flops_budget:
        steps = int(flops_budget // cost.flops) if cost.flops > 0 else 0
        what = f"{flops_budget:.3g} FLOPs at {cost.flops:.3g} FLOPs/step"
    elif hours_budget:
        steps = int(hours_budget * 3600 // cost.seconds) if cost.seconds > 0 else 0
        what = f"{hours_budget:.3g} device-hours at {cost.seconds:.3g} device-s/step"
    else:
        return None
    if steps < 1:
        raise ValueError(f"budget of {what} is less than one optimiser step")
    return steps


class StepTimer:
    """Wall time of optimiser steps (CUDA-synchronised), for per-step records and device-hour budgets."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin(self) -> None:
        self._sync()
        self.start = time.perf_counter()

    def end(self) -> float:
        self._sync()
        return time.perf_counter() - self.start

"""Typed configs of a self-supervised pretraining run (YAML files in ``configs/ssl/`` override them).

One :class:`SSLConfig` fully describes a run: the method and its parameters, the backbone, how
volumes become training crops or slices, and the optimisation. It is stored inside every checkpoint
(``meta.json``) so an encoder can be rebuilt from its checkpoint alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from slice2vol.data.io import VolumeConfig


@dataclass
class BackboneConfig:
    """Which encoder network is trained.

    Attributes:
        name: ``cnn`` (small dims-generic conv net), ``resnet`` (MONAI ResNet), ``vit`` (MONAI ViT),
            ``swin`` (the SwinUNETR encoder), ``timm`` (2D only, any timm model).
        params: builder keywords, see :mod:`slice2vol.ssl.backbones` (e.g. ``{width: 16}``,
            ``{depth: 18}``, ``{patch_size: 16, hidden_size: 384}``, ``{model: resnet18}``).
    """

    name: str = "cnn"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """How manifest volumes become training inputs.

    Every volume is loaded with ``volume`` (RAS, intensity in [0, 1], cropped to the head), resized to
    ``volume_size`` and kept in memory as ``cache_dtype``; 3D methods then sample random crops of
    ``crop_size``, 2D methods random slices of the ``planes`` resized to ``slice_size``.

    Attributes:
        volume: loading options (spacing, normalisation, foreground crop).
        volume_size: (X, Y, Z) grid every volume is resized to; ``None`` keeps the loaded grid.
        crop_size: (X, Y, Z) training crop for ``spatial_dims=3``.
        slice_size: (H, W) training slice for ``spatial_dims=2``.
        planes: planes slices are drawn from (2D).
        min_foreground: a crop/slice must hold at least this fraction of head voxels (re-drawn
            up to 10 times otherwise).
        max_subjects: use only the first N subjects (0 = all).
        cache_dtype: ``float32`` or ``float16`` (halves memory and disk for large cohorts).
        streaming: prepare volumes once to per-subject HDF5 files and read crops/slices from disk
            (memory flat in the cohort size, :mod:`slice2vol.ssl.streaming`); ``false`` keeps the
            whole cohort in memory (:class:`~slice2vol.ssl.data.VolumeBank`).
        cache_dir: where prepared volumes go (``<run dir>/volumes`` when unset); share it between
            runs on the same cohort, and put it on a file system every rank sees under DDP.
        crops_per_subject: samples drawn from each subject in a row (a batch holds
            ``batch_size / crops_per_subject`` subjects); 2 gives SimCLR the two crops of one subject
            it needs with ``method_params.positives: subject``.
        num_workers: DataLoader worker processes per training process; ``-1`` chooses
            (:func:`~slice2vol.ssl.distributed.default_num_workers`: 0 on a small CPU, up to 8 per GPU).
    """

    volume: VolumeConfig = field(default_factory=lambda: VolumeConfig(crop_foreground=True))
    volume_size: tuple[int, int, int] | None = (64, 64, 64)
    crop_size: tuple[int, int, int] = (48, 48, 48)
    slice_size: tuple[int, int] = (64, 64)
    planes: list[str] = field(default_factory=lambda: ["axial", "coronal", "sagittal"])
    min_foreground: float = 0.1
    max_subjects: int = 0
    cache_dtype: Literal["float32", "float16"] = "float32"
    streaming: bool = True
    cache_dir: str | None = None
    crops_per_subject: int = 1
    num_workers: int = -1


@dataclass
class TrainConfig:
    """Optimisation, checkpoints and logging.

    Attributes:
        steps: optimiser steps (each of ``batch_size * accumulate`` samples).
        batch_size: samples per forward pass.
        accumulate: gradient-accumulation micro-batches per optimiser step.
        lr: peak learning rate (AdamW), reached after ``warmup_steps`` of linear warm-up, then
            cosine decay to ``lr * min_lr_ratio`` at ``steps``.
        weight_decay: AdamW decay (not applied to norms and biases).
        grad_clip: max gradient norm, 0 disables.
        checkpoint_every: write ``<out>/last`` every N steps (and at the end).
        keep_every: additionally keep ``<out>/step_<N>`` every N steps (0 = never).
        log_every: metrics rows every N steps.
        seed: seeds python, numpy and torch.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        amp: mixed precision, used on CUDA only (never on CPU, where it is much slower).
        amp_dtype: ``bfloat16`` or ``float16`` (the latter with a gradient scaler).
        deterministic: ``torch.use_deterministic_algorithms(True)`` (slower; exact resume on CPU).
        budget_flops: total training FLOPs (forward + backward, all ranks); when set, ``steps`` is
            replaced by the steps this buys at the measured FLOPs per step (compute-matched runs).
        budget_device_hours: the same with wall time: device-hours (GPUs, or CPU processes, times
            hours) at the seconds per step measured over ``budget_probe_steps`` probe steps.
        budget_probe_steps: steps timed before training for ``budget_device_hours``.
        count_flops: measure FLOPs per step (one extra forward/backward on a copy at start).
        sync_batchnorm: under DDP on CUDA, batch-norm statistics over the global batch.
    """

    steps: int = 1000
    batch_size: int = 8
    accumulate: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    keep_every: int = 0
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    deterministic: bool = False
    budget_flops: float = 0.0
    budget_device_hours: float = 0.0
    budget_probe_steps: int = 3
    count_flops: bool = True
    sync_batchnorm: bool = True


@dataclass
class SSLConfig:
    """A complete pretraining run.

    Attributes:
        method: key in :data:`slice2vol.ssl.METHODS` (``simclr``, ``mae``, ...).
        spatial_dims: 3 trains on crops of volumes, 2 on slices.
        in_channels: image channels (modalities).
        method_params: keyword arguments of the method (temperature, mask ratio, ...).
    """

    method: str = "simclr"
    spatial_dims: int = 3
    in_channels: int = 1
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method_params: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def input_size(self) -> tuple[int, ...]:
        """Spatial size of one training sample: ``crop_size`` (3D) or ``slice_size`` (2D)."""
        if self.spatial_dims == 3:
            return tuple(self.data.crop_size)
        if self.spatial_dims == 2:
            return tuple(self.data.slice_size)
        raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")

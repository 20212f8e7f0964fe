"""Typed configs of a self-supervised pretraining run (YAML files in ``configs/ssl/`` override them).

One :class:`SSLConfig` fully describes a run: the method and its parameters, the backbone, how
volumes become training crops or slices, and the optimisation. It is stored inside every checkpoint
(``meta.json``) so an encoder can be rebuilt from its checkpoint alone.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from slice2vol.config import check_real as _real, check_whole
from slice2vol.data.io import VolumeConfig

#: the planes a 2D run can draw slices from (the keys of :data:`slice2vol.data.slicing.PLANES`)
PLANE_NAMES = ("sagittal", "coronal", "axial")


# a grid side no brain MRI reaches (0.1 mm over 20 cm); 10^6 voxels a side used to end in a
# MemoryError traceback after the cohort had been read
MAX_SIDE = 2048


def _size(key: str, value: Any, n: int) -> None:
    """Refuses ``value`` unless it is ``n`` whole numbers in [1, MAX_SIDE] (a crop, slice or volume grid)."""
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == n and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and 1 <= v <= MAX_SIDE for v in value)
    if not ok:
        raise ValueError(f"{key} must be {n} whole numbers in [1, {MAX_SIDE}], got {_plain(value)}")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


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

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raises ValueError (naming the ``backbone.*`` key) on a value no run can use."""
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"backbone.name must be a backbone name, got {self.name!r}")


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

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raises ValueError (naming the ``data.*`` key and its value) on a value no run can use.

        A crop larger than ``volume_size`` is allowed (the crop is zero-padded).
        """
        if self.volume_size is not None:
            _size("data.volume_size", self.volume_size, 3)
        _size("data.crop_size", self.crop_size, 3)
        _size("data.slice_size", self.slice_size, 2)
        planes = _plain(self.planes)
        if isinstance(planes, str) or not isinstance(planes, list) or not planes:
            raise ValueError(f"data.planes must be a non-empty list of {list(PLANE_NAMES)}, got {planes!r}")
        unknown = [p for p in planes if p not in PLANE_NAMES]
        if unknown:
            raise ValueError(f"data.planes: unknown plane(s) {unknown}; known: {list(PLANE_NAMES)}")
        _real("data.min_foreground", self.min_foreground, 0.0, 1.0)
        check_whole("data.max_subjects", self.max_subjects, 0)  # 0: all
        if self.cache_dtype not in ("float32", "float16"):
            raise ValueError(f"data.cache_dtype must be float32 or float16, got {self.cache_dtype!r}")
        check_whole("data.crops_per_subject", self.crops_per_subject, 1)
        check_whole("data.num_workers", self.num_workers, -1)  # -1: chosen per device


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

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raises ValueError (naming the ``train.*`` key and its value) on a value no run can use.

        ``steps: 0`` is allowed: it writes the random initialisation as a checkpoint (a baseline).
        """
        check_whole("train.steps", self.steps, 0)
        for key in ("batch_size", "accumulate", "checkpoint_every", "log_every", "budget_probe_steps"):
            check_whole(f"train.{key}", getattr(self, key), 1)
        for key in ("warmup_steps", "keep_every"):  # keep_every 0: no step_<N> copies
            check_whole(f"train.{key}", getattr(self, key), 0)
        check_whole("train.seed", self.seed, 0)
        # numpy seeds take 32 bits (the seed was silently taken modulo 2^32); a step count past 2^31 is
        # no run that ends, and overflowed int32 step counters of schedulers and logs
        for key, high in (("seed", 2 ** 32 - 1), ("steps", 2 ** 31 - 1)):
            if getattr(self, key) > high:
                raise ValueError(f"train.{key} must be at most {high}, got {getattr(self, key)!r}")
        _real("train.lr", self.lr, 0.0, low_open=True)
        _real("train.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        for key in ("weight_decay", "grad_clip", "budget_flops", "budget_device_hours"):  # 0: off
            _real(f"train.{key}", getattr(self, key), 0.0)
        if self.budget_flops and self.budget_device_hours:
            raise ValueError(f"set train.budget_flops ({self.budget_flops:g}) or train.budget_device_hours "
                             f"({self.budget_device_hours:g}), not both")
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"train.amp_dtype must be bfloat16 or float16, got {self.amp_dtype!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


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

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raises ValueError naming the first bad key and its value (run again before training, so a
        config changed after construction is checked too; no volume is read before this)."""
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"method must be an SSL method name, got {self.method!r}")
        if self.spatial_dims not in (2, 3) or isinstance(self.spatial_dims, bool):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        check_whole("in_channels", self.in_channels, 1)
        for part in (self.backbone, self.data, self.train):
            part.check()
        per_subject = self.data.crops_per_subject
        if self.train.batch_size % per_subject:
            # a rank's micro-batch is a contiguous run of sample numbers: groups must not straddle two
            raise ValueError(f"train.batch_size={self.train.batch_size} is not a whole number of groups of "
                             f"data.crops_per_subject={per_subject}")

    @property
    def input_size(self) -> tuple[int, ...]:
        """Spatial size of one training sample: ``crop_size`` (3D) or ``slice_size`` (2D)."""
        if self.spatial_dims == 3:
            return tuple(self.data.crop_size)
        if self.spatial_dims == 2:
            return tuple(self.data.slice_size)
        raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")

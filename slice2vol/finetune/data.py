"""Slices for fine-tuning: an in-memory bank cut by the same :func:`slice_volume` the cache uses, and
light batched augmentations for contrastive views.

The slices a model is fine-tuned on are therefore the slices it later embeds (same planes, same
orientation, same resizing), stored as float16 (S, C, H, W) in [0, 1].
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from slice2vol.data import Cohort, Failure, SliceConfig, VolumeConfig, load_subject, slice_volume

log = logging.getLogger(__name__)


@dataclass
class SliceBank:
    """All kept slices of a set of subjects.

    Attributes:
        ids: subject IDs, in bank order.
        images: (S, C, H, W) float16 slices in [0, 1].
        subject_index: (S,) index into ``ids`` of each slice's subject.
        failures: subjects that could not be loaded or kept no slice (the manifest's own failures
            are the cohort's, not repeated here).
    """

    ids: list[str]
    images: torch.Tensor
    subject_index: torch.Tensor
    failures: list[Failure] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @classmethod
    def from_cohort(cls, cohort: Cohort, slice_cfg: SliceConfig, volume_cfg: VolumeConfig | None = None,
                    progress: bool = True) -> "SliceBank":
        """Loads and slices every subject; failures are recorded and skipped.

        Raises:
            ValueError: no subject could be loaded, or no slice was kept.
        """
        from slice2vol.progress import track

        ids, chunks, owners, failures = [], [], [], []
        for subject in track(cohort.subjects, desc="slicing", unit="subj", enabled=progress):
            try:
                volume = load_subject(subject, volume_cfg, with_seg=False)
            except Exception as err:  # noqa: BLE001 - one subject's files fail that subject only
                failures.append(Failure.of(subject, err))
                log.warning("skipping %s", failures[-1].message)
                continue
            planes = slice_volume(volume, slice_cfg)
            images = torch.cat([p.images for p in planes.values()]).to(torch.float16)
            if len(images) == 0:
                # the cache's wording: the file, and the fullest slice's foreground fraction
                from slice2vol.extract import no_slices_problem

                where = next(iter(subject.images.values()), "")
                failures.append(Failure(subject.subject_id, str(where),
                                        f"{where}: {no_slices_problem(volume, list(planes), slice_cfg)}"))
                log.warning("skipping %s", failures[-1].message)
                continue
            owners.append(torch.full((len(images),), len(ids), dtype=torch.long))
            ids.append(subject.subject_id)
            chunks.append(images)
        if not ids:
            every = list(getattr(cohort, "failures", [])) + failures  # the manifest's own rows left out too
            first = f"; first: {every[0]}" if every else ""
            raise ValueError(f"{cohort.source}: no subject gave slices ({len(every)} failures{first})")
        return cls(ids, torch.cat(chunks), torch.cat(owners), failures)

    def subset(self, ids: Sequence[str]) -> "SliceBank":
        """The slices of the given subjects only (unknown IDs are an error)."""
        position = {s: i for i, s in enumerate(self.ids)}
        missing = [s for s in ids if s not in position]
        if missing:
            raise KeyError(f"subjects not in the slice bank: {missing[:5]}")
        keep_subjects = torch.tensor([position[s] for s in ids], dtype=torch.long)
        remap = torch.full((len(self.ids),), -1, dtype=torch.long)
        remap[keep_subjects] = torch.arange(len(ids))
        mask = remap[self.subject_index] >= 0
        return SliceBank(list(ids), self.images[mask], remap[self.subject_index[mask]], list(self.failures))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, C, H, W) float32 random slices (uniform over all slices)."""
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return self.images[idx].float()

    def sample_subjects(self, n_subjects: int, per_subject: int,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(slices (n_subjects * per_subject, C, H, W), subject indices (n_subjects,)), drawn with replacement."""
        subjects = torch.randint(0, len(self.ids), (n_subjects,), generator=generator)
        picks = []
        for s in subjects.tolist():
            rows = torch.nonzero(self.subject_index == s).flatten()
            picks.append(rows[torch.randint(0, len(rows), (per_subject,), generator=generator)])
        return self.images[torch.cat(picks)].float(), subjects


@dataclass
class AugmentConfig:
    """Random view parameters (SimCLR-style, tuned for MR slices: no colour jitter).

    Attributes:
        crop_scale: (min, max) side fraction of the random resized crop.
        flip_prob: left-right flip probability.
        rotate_deg: maximal in-plane rotation.
        gamma: (min, max) gamma applied to intensities.
        intensity_scale, intensity_shift: ``x * (1 + s) + o``, s and o uniform in +- these.
        noise_std: maximal std of additive Gaussian noise.
    """

    crop_scale: tuple[float, float] = (0.6, 1.0)
    flip_prob: float = 0.5
    rotate_deg: float = 10.0
    gamma: tuple[float, float] = (0.7, 1.5)
    intensity_scale: float = 0.2
    intensity_shift: float = 0.1
    noise_std: float = 0.03


def augment(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random view per image, batched: (B, C, H, W) in [0, 1] -> (B, C, H, W) in [0, 1].

    A single affine resampling does crop, flip and rotation; then gamma, scale/shift and noise.
    """
    b = images.shape[0]
    dev = images.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return (torch.rand(b, generator=generator) * (hi - lo) + lo).to(dev)

    scale = uniform(*cfg.crop_scale)
    angle = uniform(-cfg.rotate_deg, cfg.rotate_deg) * math.pi / 180
    flip = torch.where(uniform(0, 1) < cfg.flip_prob, -1.0, 1.0)
    shift_x, shift_y = (uniform(-1, 1) * (1 - scale)), (uniform(-1, 1) * (1 - scale))
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift_x], 1),
                         torch.stack([sin * flip, cos, shift_y], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    x = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma = uniform(*cfg.gamma).view(-1, 1, 1, 1)
    x = x.clamp(0, 1).pow(gamma)
    x = x * (1 + uniform(-cfg.intensity_scale, cfg.intensity_scale).view(-1, 1, 1, 1))
    x = x + uniform(-cfg.intensity_shift, cfg.intensity_shift).view(-1, 1, 1, 1)
    noise = torch.randn(images.shape, generator=generator).to(dev) * uniform(0, cfg.noise_std).view(-1, 1, 1, 1)
    return (x + noise).clamp(0, 1)


def standardise(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(values - mean) / std with the statistics returned (std 1 when constant)."""
    mean, std = float(np.mean(values)), float(np.std(values))
    std = std if std > 0 else 1.0
    return (values - mean) / std, mean, std

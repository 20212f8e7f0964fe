"""Training data for SSL: cohort volumes held in memory, sampled as random 3D crops or 2D slices.

Volumes are loaded once through :func:`slice2vol.data.manifest.load_subject` (RAS, intensity in
[0, 1], cropped to the head), fitted into a fixed grid preserving the physical aspect ratio (the
way :func:`slice2vol.data.slicing.slice_volume` fits slices), and kept as tensors. Sampling uses the
global torch RNG only, so the trainer's checkpointed RNG state makes a resumed run draw exactly the
batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from slice2vol.data.io import Volume, VolumeConfig, VolumeError
from slice2vol.data.manifest import Cohort, Failure, load_subject
from slice2vol.data.slicing import PLANES, _plane_view

log = logging.getLogger(__name__)


def fit_to_grid(data: torch.Tensor, spacing: Sequence[float], size: Sequence[int],
                mode: str = "trilinear") -> torch.Tensor:
    """Resizes (C, X, Y, Z) so its physical extent fits ``size`` with the aspect ratio kept, then zero-pads.

    Args:
        data: (C, X, Y, Z) tensor.
        spacing: voxel size in mm of ``data``.
        size: target grid (X', Y', Z').
        mode: ``trilinear`` for images, ``nearest`` for masks.

    Returns:
        (C, X', Y', Z') tensor, content centred.
    """
    extent = [n * s for n, s in zip(data.shape[1:], spacing)]
    scale = min(t / e for t, e in zip(size, extent))
    new = [max(1, min(t, int(round(e * scale)))) for t, e in zip(size, extent)]
    x = data[None].float()
    if list(x.shape[2:]) != new:
        kwargs = {"align_corners": False} if mode == "trilinear" else {}
        x = F.interpolate(x, size=new, mode=mode, **kwargs)
    pad: list[int] = []
    for t, n in reversed(list(zip(size, new))):
        before = (t - n) // 2
        pad += [before, t - n - before]
    return F.pad(x, pad)[0]


def prepare_volume(volume: Volume, volume_size: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A loaded volume -> (image (C, X', Y', Z') float32, head mask (X', Y', Z') bool) on the SSL grid."""
    image = torch.from_numpy(np.ascontiguousarray(volume.data, dtype=np.float32))
    mask = torch.from_numpy(np.ascontiguousarray(volume.mask))
    if volume_size is None:
        return image, mask
    image = fit_to_grid(image, volume.spacing, volume_size)
    mask = fit_to_grid(mask[None].float(), volume.spacing, volume_size, mode="nearest")[0] > 0.5
    return image, mask


@dataclass
class VolumeBank:
    """Prepared volumes in memory.

    Attributes:
        ids: subject IDs.
        images: one (C, X, Y, Z) tensor per subject.
        masks: one (X, Y, Z) bool tensor per subject.
        failures: subjects that could not be loaded.
    """

    ids: list[str]
    images: list[torch.Tensor]
    masks: list[torch.Tensor]
    failures: list[Failure] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def in_channels(self) -> int:
        return int(self.images[0].shape[0])

    @classmethod
    def from_cohort(cls, cohort: Cohort, volume_cfg: VolumeConfig | None = None,
                    volume_size: Sequence[int] | None = (64, 64, 64), *, max_subjects: int = 0,
                    dtype: str = "float32", progress: bool = True) -> "VolumeBank":
        """Loads every subject (failures are recorded and skipped)."""
        from tqdm.auto import tqdm

        subjects = cohort.subjects[:max_subjects] if max_subjects else cohort.subjects
        bank = cls([], [], [])
        for subject in tqdm(subjects, desc="loading volumes", disable=not progress, leave=False):
            try:
                volume = load_subject(subject, volume_cfg, with_seg=False)
            except VolumeError as err:
                bank.failures.append(Failure(subject.subject_id, err.path, str(err)))
                log.warning("skipping %s", err)
                continue
            image, mask = prepare_volume(volume, volume_size)
            bank.ids.append(subject.subject_id)
            bank.images.append(image.to(getattr(torch, dtype)))
            bank.masks.append(mask)
        if not bank.ids:
            raise ValueError(f"{cohort.source}: no volume could be loaded ({len(bank.failures)} failures)")
        return bank

    @classmethod
    def synthetic(cls, n_subjects: int = 8, size: Sequence[int] = (48, 48, 48), seed: int = 0) -> "VolumeBank":
        """Blob 'heads' with random inner structure, for tests and demos without data."""
        rng = np.random.default_rng(seed)
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in size], indexing="ij"))
        bank = cls([], [], [])
        for i in range(n_subjects):
            radii = rng.uniform(0.7, 0.95, 3)[:, None, None, None]
            r = np.sqrt(((grid / radii) ** 2).sum(0))
            vol = np.clip(1.1 - r, 0, None)
            for _ in range(4):
                centre = rng.uniform(-0.5, 0.5, 3)[:, None, None, None]
                blob = np.exp(-((grid - centre) ** 2).sum(0) / rng.uniform(0.01, 0.05))
                vol += rng.uniform(-0.4, 0.4) * blob
            vol = np.where(r < 1, vol, 0) + rng.normal(0, 0.01, size)
            vol = (vol - vol.min()) / (vol.max() - vol.min())
            bank.ids.append(f"blob{i:03d}")
            bank.images.append(torch.from_numpy(vol.astype(np.float32))[None])
            bank.masks.append(torch.from_numpy(r < 1))
        return bank


class CropDataset:
    """Random 3D crops of the bank's volumes (zero-padded where a volume is smaller).

    ``sample(n)`` draws subjects uniformly and crop corners uniformly, re-drawing (up to 10 times)
    crops with less than ``min_foreground`` head voxels.
    """

    def __init__(self, bank: VolumeBank, crop_size: Sequence[int], min_foreground: float = 0.1) -> None:
        self.bank, self.crop_size, self.min_foreground = bank, tuple(crop_size), min_foreground

    def __len__(self) -> int:
        return len(self.bank)

    def _crop(self, i: int) -> torch.Tensor:
        image, mask = self.bank.images[i], self.bank.masks[i]
        pad = []
        for s, c in reversed(list(zip(image.shape[1:], self.crop_size))):
            extra = max(0, c - s)
            pad += [extra // 2, extra - extra // 2]
        if any(pad):
            image = F.pad(image, pad)
            mask = F.pad(mask[None].float(), pad)[0] > 0.5
        for _ in range(10):
            starts = [int(torch.randint(0, s - c + 1, ()).item()) for s, c in zip(image.shape[1:], self.crop_size)]
            box = tuple(slice(a, a + c) for a, c in zip(starts, self.crop_size))
            if mask[box].float().mean() >= self.min_foreground:
                break
        return image[(slice(None), *box)].float()

    def __getitem__(self, i: int) -> torch.Tensor:
        """A random crop of subject ``i``, (C, *crop_size)."""
        return self._crop(i)

    def sample(self, n: int) -> torch.Tensor:
        """(n, C, *crop_size) random crops of random subjects."""
        idx = torch.randint(0, len(self.bank), (n,)).tolist()
        return torch.stack([self._crop(i) for i in idx])


class SliceDataset:
    """Random 2D slices of the bank's volumes, in the display orientation of ``slice_volume``.

    Only slices with at least ``min_foreground`` head pixels are drawn; they are resized to
    ``slice_size``.
    """

    def __init__(self, bank: VolumeBank, slice_size: Sequence[int], planes: Sequence[str] = tuple(PLANES),
                 min_foreground: float = 0.1) -> None:
        unknown = [p for p in planes if p not in PLANES]
        if unknown:
            raise ValueError(f"unknown plane(s) {unknown}; known: {list(PLANES)}")
        self.bank, self.slice_size, self.planes = bank, tuple(slice_size), list(planes)
        self.valid: list[list[torch.Tensor]] = []
        for mask in bank.masks:
            per_plane = []
            for plane in self.planes:
                fg = _plane_view(mask.float(), plane).flatten(1).mean(1)
                idx = torch.nonzero(fg >= min_foreground).flatten()
                per_plane.append(idx if len(idx) else torch.arange(len(fg)))
            self.valid.append(per_plane)

    def __len__(self) -> int:
        return len(self.bank)

    def _slice(self, i: int) -> torch.Tensor:
        p = int(torch.randint(0, len(self.planes), ()).item())
        candidates = self.valid[i][p]
        index = candidates[int(torch.randint(0, len(candidates), ()).item())]
        image = _plane_view(self.bank.images[i].float(), self.planes[p])[:, index]  # (C, rows, cols)
        if tuple(image.shape[1:]) != self.slice_size:
            image = F.interpolate(image[None], size=self.slice_size, mode="bilinear", align_corners=False)[0]
        return image

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._slice(i)

    def sample(self, n: int) -> torch.Tensor:
        """(n, C, *slice_size) random slices of random subjects."""
        idx = torch.randint(0, len(self.bank), (n,)).tolist()
        return torch.stack([self._slice(i) for i in idx])


def make_dataset(bank: VolumeBank, spatial_dims: int, data_cfg) -> CropDataset | SliceDataset:
    """The sampler a run with ``spatial_dims`` trains on (``data_cfg``: :class:`~slice2vol.ssl.config.DataConfig`)."""
    if spatial_dims == 3:
        return CropDataset(bank, data_cfg.crop_size, data_cfg.min_foreground)
    if spatial_dims == 2:
        return SliceDataset(bank, data_cfg.slice_size, data_cfg.planes, data_cfg.min_foreground)
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")

"""Training data for SSL: cohort volumes sampled as random 3D crops or 2D slices.

Volumes are loaded through :func:`slice2vol.data.manifest.load_subject` (RAS, intensity in [0, 1],
cropped to the head) and fitted into a fixed grid preserving the physical aspect ratio (the way
:func:`slice2vol.data.slicing.slice_volume` fits slices). The samplers (:class:`CropDataset`,
:class:`SliceDataset`) read through a small *volume-source* interface with two implementations:
:class:`VolumeBank` keeps every volume in memory, :class:`~slice2vol.ssl.streaming.PreparedVolumes`
reads crops and slices from per-subject HDF5 files (memory flat in cohort size). ``sample(n)``
draws from the global torch RNG; ``draw(i, generator)`` from an explicit generator, which the
trainer seeds per sample so a batch depends only on (seed, step), whatever the number of processes,
DataLoader workers or restarts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from slice2vol.data.io import Volume, VolumeConfig
from slice2vol.data.manifest import Cohort, Failure, load_subject
from slice2vol.data.slicing import PLANES, _plane_view, plane_foreground

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


def failure_lines(*groups) -> list[str]:
    """The failures of ``groups`` (the manifest's left-out rows, then the load failures) as lines, each once."""
    lines: list[str] = []
    for group in groups:
        for failure in group or []:
            line = str(failure)
            if line not in lines:
                lines.append(line)
    return lines


def no_subject_loaded(cohort: Cohort, failures) -> str:
    """The one-line error of a cohort none of whose subjects could be loaded: the manifest, how many rows
    failed (the manifest's own left-out rows included) and the first failure."""
    lines = failure_lines(getattr(cohort, "failures", []), failures)
    return (f"{getattr(cohort, 'source', '') or 'cohort'}: no subject could be loaded "
            f"({len(lines)} failures; first: {lines[0] if lines else '-'})")


@dataclass
class VolumeBank:
    """Prepared volumes in memory (small cohorts, tests; ``data.streaming: false``).

    Implements the volume-source interface the samplers read through (``shape``, ``read_image``,
    ``read_mask``, ``read_slice``, ``slice_foreground``), like the on-disk
    :class:`~slice2vol.ssl.streaming.PreparedVolumes` that large cohorts stream from.

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

    # -- volume-source interface ------------------------------------------------------------------
    def shape(self, i: int) -> tuple[int, ...]:
        """Spatial shape (X, Y, Z) of subject ``i``."""
        return tuple(self.images[i].shape[1:])

    def read_image(self, i: int, box: tuple[slice, ...]) -> torch.Tensor:
        """(C, *box) float32 voxels of subject ``i`` (a copy)."""
        return self.images[i][(slice(None), *box)].float()

    def read_mask(self, i: int, box: tuple[slice, ...]) -> torch.Tensor:
        """(*box) bool head mask of subject ``i``."""
        return self.masks[i][box]

    def read_slice(self, i: int, plane: str, index: int) -> torch.Tensor:
        """(C, rows, cols) float32 slice ``index`` of ``plane`` in display orientation."""
        # select before converting and flipping: both copy, and this runs once per training sample
        return _plane_view(self.images[i], plane, torch.tensor([index]))[:, 0].float()

    def slice_foreground(self, i: int, plane: str) -> torch.Tensor:
        """(n_slices,) head fraction of every slice of ``plane``."""
        return torch.from_numpy(plane_foreground(self.masks[i], plane))

    def subset(self, ids: Sequence[str]) -> "VolumeBank":
        """The given subjects only, in the given order (unknown IDs are an error)."""
        position = {s: k for k, s in enumerate(self.ids)}
        missing = [s for s in ids if s not in position]
        if missing:
            raise KeyError(f"{len(missing)} subject(s) not in the volume bank, e.g. {missing[:3]}")
        keep = [position[s] for s in ids]
        return VolumeBank([self.ids[k] for k in keep], [self.images[k] for k in keep],
                          [self.masks[k] for k in keep], list(self.failures))

    @classmethod
    def from_cohort(cls, cohort: Cohort, volume_cfg: VolumeConfig | None = None,
                    volume_size: Sequence[int] | None = (64, 64, 64), *, max_subjects: int = 0,
                    dtype: str = "float32", progress: bool = True) -> "VolumeBank":
        """Loads every subject (failures are recorded and skipped)."""
        from slice2vol.progress import track

        subjects = cohort.subjects[:max_subjects] if max_subjects else cohort.subjects
        bank = cls([], [], [])
        for subject in track(subjects, desc="loading volumes", unit="subj", enabled=progress):
            try:
                volume = load_subject(subject, volume_cfg, with_seg=False)
            except Exception as err:  # noqa: BLE001 - one subject's files fail that subject only
                bank.failures.append(Failure.of(subject, err))
                log.warning("skipping %s", bank.failures[-1].message)
                continue
            image, mask = prepare_volume(volume, volume_size)
            bank.ids.append(subject.subject_id)
            bank.images.append(image.to(getattr(torch, dtype)))
            bank.masks.append(mask)
        if not bank.ids:
            raise ValueError(no_subject_loaded(cohort, bank.failures))
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


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [0, high) from ``generator`` (the global torch RNG when ``None``)."""
    return int(torch.randint(0, high, (), generator=generator).item())


def read_padded(source, i: int, starts: Sequence[int], size: Sequence[int], *, mask: bool = False) -> torch.Tensor:
    """The box ``starts + size`` of subject ``i`` on its grid zero-padded (centred) up to ``size``.

    Where a volume is smaller than the box along an axis it is centred in a zero-padded grid first
    (``starts`` index that padded grid), so crops larger than the volume are valid.

    Returns:
        (C, *size) float32 image, or (*size) bool mask with ``mask=True``.
    """
    shape = source.shape(i)
    pads = [max(0, c - n) // 2 for n, c in zip(shape, size)]
    real, inner = [], []
    for start, c, n, pad in zip(starts, size, shape, pads):
        a, b = start - pad, start - pad + c  # box in real voxel coordinates
        lo, hi = max(0, a), min(n, b)
        real.append(slice(lo, max(lo, hi)))
        inner.append(slice(lo - a, lo - a + max(0, hi - lo)))
    box = tuple(real)
    if mask:
        part = source.read_mask(i, box)
        out = torch.zeros(tuple(size), dtype=torch.bool)
        out[tuple(inner)] = part
        return out
    part = source.read_image(i, box)
    if tuple(part.shape[1:]) == tuple(size):
        return part
    out = torch.zeros((part.shape[0], *size), dtype=torch.float32)
    out[(slice(None), *inner)] = part
    return out


class CropDataset:
    """Random 3D crops of a volume source (zero-padded where a volume is smaller than the crop).

    The source is a :class:`VolumeBank` (in memory) or a
    :class:`~slice2vol.ssl.streaming.PreparedVolumes` (read from disk crop by crop). ``sample(n)``
    draws subjects uniformly and crop corners uniformly, re-drawing (up to 10 times) crops with less
    than ``min_foreground`` head voxels; :meth:`draw` does the same for one subject from a given
    generator (the seeded, streaming path of the trainer).
    """

    def __init__(self, bank, crop_size: Sequence[int], min_foreground: float = 0.1, per_subject: int = 1) -> None:
        self.bank, self.crop_size, self.min_foreground = bank, tuple(crop_size), min_foreground
        self.per_subject = per_subject

    def __len__(self) -> int:
        return len(self.bank)

    def draw(self, i: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random crop of subject ``i``, (C, *crop_size) float32."""
        grid = [max(n, c) for n, c in zip(self.bank.shape(i), self.crop_size)]
        for _ in range(10):
            starts = [_randint(n - c + 1, generator) for n, c in zip(grid, self.crop_size)]
            fg = read_padded(self.bank, i, starts, self.crop_size, mask=True).float().mean()
            if fg >= self.min_foreground:
                break
        return read_padded(self.bank, i, starts, self.crop_size)

    def _crop(self, i: int) -> torch.Tensor:
        return self.draw(i)

    def __getitem__(self, i: int) -> torch.Tensor:
        """A random crop of subject ``i``, (C, *crop_size)."""
        return self.draw(i)

    def sample(self, n: int) -> torch.Tensor:
        """(n, C, *crop_size) random crops of random subjects (global torch RNG), ``per_subject`` in a row."""
        return torch.stack([self.draw(i) for i in _subject_draws(n, len(self.bank), self.per_subject)])


class SliceDataset:
    """Random 2D slices of a volume source, in the display orientation of ``slice_volume``.

    Only slices with at least ``min_foreground`` head pixels are drawn; they are resized to
    ``slice_size``.
    """

    def __init__(self, bank, slice_size: Sequence[int], planes: Sequence[str] = tuple(PLANES),
                 min_foreground: float = 0.1, per_subject: int = 1) -> None:
        unknown = [p for p in planes if p not in PLANES]
        if unknown:
            raise ValueError(f"unknown plane(s) {unknown}; known: {list(PLANES)}")
        self.bank, self.slice_size, self.planes = bank, tuple(slice_size), list(planes)
        self.min_foreground, self.per_subject = min_foreground, per_subject
        self._valid: dict[tuple[int, str], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.bank)

    def valid_slices(self, i: int, plane: str) -> torch.Tensor:
        """Indices of the slices of ``plane`` with enough head (all of them if none has)."""
        key = (i, plane)
        if key not in self._valid:
            fg = self.bank.slice_foreground(i, plane)
            idx = torch.nonzero(fg >= self.min_foreground).flatten()
            self._valid[key] = idx if len(idx) else torch.arange(len(fg))
        return self._valid[key]

    def draw(self, i: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random slice of subject ``i``, (C, *slice_size) float32."""
        plane = self.planes[_randint(len(self.planes), generator)]
        candidates = self.valid_slices(i, plane)
        index = int(candidates[_randint(len(candidates), generator)])
        image = self.bank.read_slice(i, plane, index)  # (C, rows, cols)
        if tuple(image.shape[1:]) != self.slice_size:
            image = F.interpolate(image[None], size=self.slice_size, mode="bilinear", align_corners=False)[0]
        return image

    def _slice(self, i: int) -> torch.Tensor:
        return self.draw(i)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.draw(i)

    def sample(self, n: int) -> torch.Tensor:
        """(n, C, *slice_size) random slices of random subjects (global torch RNG), ``per_subject`` in a row."""
        return torch.stack([self.draw(i) for i in _subject_draws(n, len(self.bank), self.per_subject)])


def _subject_draws(n: int, n_subjects: int, per_subject: int) -> list[int]:
    """Subject index of each of ``n`` samples: random subjects, each repeated ``per_subject`` times in a row."""
    if n % per_subject:
        raise ValueError(f"a batch of {n} is not a whole number of groups of {per_subject} samples per subject")
    subjects = torch.randint(0, n_subjects, (n // per_subject,)).tolist()
    return [s for s in subjects for _ in range(per_subject)]


def make_dataset(bank, spatial_dims: int, data_cfg) -> CropDataset | SliceDataset:
    """The sampler a run with ``spatial_dims`` trains on.

    Args:
        bank: a volume source (:class:`VolumeBank` or :class:`~slice2vol.ssl.streaming.PreparedVolumes`).
        spatial_dims: 3 (crops) or 2 (slices).
        data_cfg: :class:`~slice2vol.ssl.config.DataConfig`.
    """
    per_subject = getattr(data_cfg, "crops_per_subject", 1)
    if spatial_dims == 3:
        return CropDataset(bank, data_cfg.crop_size, data_cfg.min_foreground, per_subject)
    if spatial_dims == 2:
        return SliceDataset(bank, data_cfg.slice_size, data_cfg.planes, data_cfg.min_foreground, per_subject)
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")

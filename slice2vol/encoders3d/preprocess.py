"""Spatial and intensity recipes of 3D encoders: a loaded ``Volume`` -> network input (1, C, X, Y, Z).

A :class:`Recipe` is applied in the order the authors' pipelines use: resample to ``spacing``
(trilinear, ``align_corners=False``, as :func:`slice2vol.data.io.resample`), crop to the head's
bounding box, bring to ``size`` (``pad_crop``: centred zero pad / crop like MONAI
``ResizeWithPadOrCrop``; ``resize``: interpolate to the size; ``fit``: resize keeping the aspect ratio,
then pad), pad to a multiple of ``divisor`` (MONAI ``DivisiblePad``), reorder axes, and finally the
intensity transform (MONAI ``NormalizeIntensity``, or percentile / min-max scaling), computed on the
voxels that came from the volume (zero padding never enters the statistics).

Families whose authors do something else (deepbet's detection crop, MedicalNet's noise background)
implement their own ``preprocess`` and reuse the pieces here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from slice2vol.data.io import Volume, resample

Intensity = Literal["zscore_nonzero", "zscore_foreground", "zscore_volume", "zscore_masked", "minmax",
                    "minmax_volume", "percentile", "range", "none"]
Resize = Literal["pad_crop", "resize", "fit", "none"]

AXES = {"RAS": (0, 1, 2), "SAR": (2, 1, 0)}


def plain(x) -> torch.Tensor:
    """A plain ``torch.Tensor`` (MONAI transforms return ``MetaTensor`` s, which would leak into outputs)."""
    return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def volume_tensor(volume: Volume, channels: Sequence[int] | None = None) -> torch.Tensor:
    """(C, X, Y, Z) float32 tensor of the volume (NaN/Inf -> 0), optionally only ``channels``."""
    data = np.nan_to_num(np.asarray(volume.data, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if channels is not None:
        data = data[list(channels)]
    return torch.from_numpy(np.ascontiguousarray(data))


def select_channels(volume: Volume, in_chans: int, channel: int | Sequence[int] | None) -> list[int]:
    """Which of the volume's C channels feed a network taking ``in_chans``: ``channel`` if given, else the
    first ``in_chans`` (e.g. T1 of a T1+T2 manifest)."""
    n = volume.data.shape[0]
    if channel is None:
        chosen = list(range(min(in_chans, n)))
    else:
        chosen = [int(channel)] if isinstance(channel, (int, np.integer)) else [int(c) for c in channel]
    if any(not 0 <= c < n for c in chosen):
        raise ValueError(f"{volume.subject_id}: channel {chosen} out of range (the volume has {n})")
    if len(chosen) != in_chans:
        raise ValueError(f"{volume.subject_id}: the network takes {in_chans} channel(s), got {len(chosen)} "
                         f"(volume channels {list(volume.modalities)}; choose with channel=...)")
    return chosen


def head_box(mask: torch.Tensor, margin: int = 0) -> tuple[slice, slice, slice]:
    """Bounding box of a (X, Y, Z) mask plus ``margin`` voxels (the whole grid when empty)."""
    if not bool(mask.any()):
        return tuple(slice(0, n) for n in mask.shape)  # type: ignore[return-value]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = torch.nonzero(mask.any(dim=other)).flatten()
        start = max(int(idx.min()) - margin, 0)
        stop = min(int(idx.max()) + 1 + margin, mask.shape[axis])
        box.append(slice(start, stop))
    return tuple(box)  # type: ignore[return-value]


def pad_or_crop(x: torch.Tensor, size: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Centred pad / crop of (C, X, Y, Z) to ``size`` (MONAI ``ResizeWithPadOrCrop``, symmetric)."""
    from monai.transforms import ResizeWithPadOrCrop

    return plain(ResizeWithPadOrCrop(tuple(int(s) for s in size), mode="constant", value=value)(x))


def pad_divisible(x: torch.Tensor, k: int, value: float = 0.0) -> torch.Tensor:
    """Symmetric pad of (C, X, Y, Z) so every spatial size is a multiple of ``k`` (MONAI ``DivisiblePad``)."""
    if k <= 1:
        return x
    from monai.transforms import DivisiblePad

    return plain(DivisiblePad(k, method="symmetric", mode="constant", value=value)(x))


def fit_into(x: torch.Tensor, size: Sequence[int], mode: str = "trilinear") -> torch.Tensor:
    """Resize (C, X, Y, Z) so it fits ``size`` with the aspect ratio kept, then centred zero pad."""
    scale = min(t / n for t, n in zip(size, x.shape[1:]))
    new = [max(1, min(int(t), int(round(n * scale)))) for t, n in zip(size, x.shape[1:])]
    x = resize_to(x, new, mode)
    return pad_or_crop(x, size)


def resize_to(x: torch.Tensor, size: Sequence[int], mode: str = "trilinear") -> torch.Tensor:
    """Interpolate (C, X, Y, Z) to ``size``: ``trilinear`` (``align_corners=False``), ``area`` (MONAI
    ``Resize``'s default: block averages when shrinking) or ``nearest``."""
    size = [int(s) for s in size]
    if list(x.shape[1:]) == size:
        return x
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    mode = "nearest-exact" if mode == "nearest" else mode
    return F.interpolate(x[None].float(), size=size, mode=mode, **kwargs)[0]


def normalize_intensity(x: torch.Tensor, valid: torch.Tensor, recipe: "Recipe") -> torch.Tensor:
    """Intensity step of a recipe on (C, X, Y, Z); statistics only over ``valid`` (X, Y, Z) voxels."""
    from monai.transforms import NormalizeIntensity

    kind = recipe.intensity
    if kind == "none":
        return x
    out = torch.empty_like(x)
    for c in range(x.shape[0]):
        channel = x[c]
        inside = channel[valid] if bool(valid.any()) else channel.flatten()
        if kind == "zscore_nonzero":
            # MONAI NormalizeIntensity(nonzero=True): stats on nonzero voxels, zeros stay zero
            out[c] = plain(NormalizeIntensity(nonzero=True)(channel))
        elif kind in ("zscore_foreground", "zscore_volume", "zscore_masked"):
            std = float(inside.std()) if inside.numel() > 1 else 1.0
            out[c] = plain(NormalizeIntensity(subtrahend=float(inside.mean()), divisor=max(std, 1e-8))(channel))
            if kind == "zscore_masked":  # standardised inside the mask, 0 outside (3D-Neuro-SimCLR)
                out[c] = out[c] * valid  # here ``valid`` is the mask the statistics came from
        elif kind in ("minmax", "minmax_volume"):
            lo, hi = float(inside.min()), float(inside.max())
            out[c] = ((channel - lo) / max(hi - lo, 1e-8)).clamp(0, 1)
        elif kind == "range":  # fixed window to [0, 1] (Models Genesis: MRI 0-4000)
            lo, hi = recipe.value_range
            out[c] = ((channel - lo) / max(hi - lo, 1e-8)).clamp(0, 1)
        elif kind == "percentile":
            sample = inside.float()[:: max(1, inside.numel() // 4_000_000)]  # torch.quantile caps the size
            lo, hi = (float(torch.quantile(sample, p / 100.0)) for p in recipe.percentiles)
            out[c] = ((channel - lo) / max(hi - lo, 1e-8)).clamp(0, 1)
        else:
            raise ValueError(f"unknown intensity recipe {kind!r}")
    return out


@dataclass
class Recipe:
    """A spatial + intensity recipe (see the module docstring for the order of steps).

    Attributes:
        spacing: target voxel size in mm; ``None`` keeps the volume's grid.
        crop: ``foreground`` crops to the head mask's bounding box (+ ``margin``), ``none`` keeps all.
        margin: voxels kept around the head box.
        resize: how the (cropped) volume reaches ``size`` (``pad_crop``, ``resize``, ``fit``, ``none``).
        size: network input (X, Y, Z) in the network's axis order; ``None`` keeps the volume's size.
        divisor: pad every spatial size to a multiple of this (the network's total stride).
        axes: voxel axis order fed to the network (``RAS`` or ``SAR``).
        intensity: ``zscore_nonzero`` (nnU-Net/BraTS style), ``zscore_foreground`` (inside the head
            mask), ``minmax`` (head range to [0, 1]), ``percentile`` (``percentiles`` to [0, 1]), ``none``.
        percentiles: for ``percentile``.
        value_range: for ``range``: this window of raw values is clipped and scaled to [0, 1].
        interpolation: ``trilinear``, ``area`` or ``nearest`` for ``resize``/``fit``.

    Intensity statistics are taken over the head mask for ``zscore_foreground``, ``zscore_masked``,
    ``minmax`` and ``percentile``, over every voxel of the (cropped) volume for ``zscore_volume`` and
    ``minmax_volume``, and over nonzero voxels for ``zscore_nonzero``.
    """

    spacing: tuple[float, float, float] | None = None
    crop: Literal["foreground", "none"] = "foreground"
    margin: int = 0
    resize: Resize = "pad_crop"
    size: tuple[int, int, int] | None = None
    divisor: int = 1
    axes: str = "RAS"
    intensity: Intensity = "zscore_foreground"
    percentiles: tuple[float, float] = (0.5, 99.5)
    value_range: tuple[float, float] = (0.0, 1.0)
    interpolation: str = "trilinear"

    def describe(self) -> tuple[str, str]:
        """(spatial recipe, intensity recipe) in words, for :class:`Encoder3DInfo`."""
        parts = ["RAS" if self.axes == "RAS" else f"RAS reordered to {self.axes}"]
        parts.append(f"resampled to {self.spacing} mm" if self.spacing else "native grid")
        if self.crop == "foreground":
            parts.append(f"cropped to the head box (+{self.margin} vox)")
        if self.size is not None and self.resize != "none":
            parts.append({"pad_crop": "centre pad/crop", "resize": "resized", "fit": "resized (aspect kept) and padded"}
                         [self.resize] + f" to {tuple(self.size)}")
        if self.divisor > 1:
            parts.append(f"padded to a multiple of {self.divisor}")
        intensity = {
            "zscore_nonzero": "z-score over nonzero voxels, zeros kept (MONAI NormalizeIntensity nonzero=True)",
            "zscore_foreground": "z-score over the head mask",
            "zscore_volume": "z-score over the whole (cropped) volume",
            "zscore_masked": "z-score inside the head mask, 0 outside",
            "minmax": "min-max of the head to [0, 1]",
            "minmax_volume": "min-max of the whole volume to [0, 1] (MONAI ScaleIntensity)",
            "range": f"raw values {self.value_range} clipped and scaled to [0, 1]",
            "percentile": f"percentiles {self.percentiles} of the head to [0, 1], clipped",
            "none": "raw intensities",
        }[self.intensity]
        return ", ".join(parts), intensity

    def apply(self, volume: Volume, channels: Sequence[int]) -> torch.Tensor:
        """Volume -> (1, len(channels), *spatial) float32 tensor."""
        x = volume_tensor(volume, channels)
        mask = torch.from_numpy(np.ascontiguousarray(volume.mask)).bool()
        affine = volume.affine
        if self.spacing is not None and not np.allclose(volume.spacing, self.spacing, atol=1e-3):
            data, _ = resample(x.numpy(), affine, self.spacing, order="linear")
            mask_np, _ = resample(mask.numpy().astype(np.uint8), affine, self.spacing, order="nearest")
            x, mask = torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(mask_np > 0)
        if self.crop == "foreground":
            box = head_box(mask, self.margin)
            x, mask = x[(slice(None), *box)], mask[box]
        valid = torch.ones_like(mask)
        if self.axes != "RAS":
            order = AXES[self.axes]
            x = x.permute(0, *(a + 1 for a in order))
            mask, valid = mask.permute(*order), valid.permute(*order)
        stacked = torch.cat([x, mask[None].float(), valid[None].float()])
        if self.size is not None and self.resize != "none":
            if self.resize == "pad_crop":
                stacked = pad_or_crop(stacked, self.size)
            elif self.resize == "resize":
                stacked = torch.cat([resize_to(stacked[:-2], self.size, self.interpolation),
                                     resize_to(stacked[-2:], self.size, "nearest")])
            elif self.resize == "fit":
                stacked = torch.cat([fit_into(stacked[:-2], self.size, self.interpolation),
                                     fit_into(stacked[-2:], self.size, "nearest")])
            else:
                raise ValueError(f"unknown resize {self.resize!r}")
        stacked = pad_divisible(stacked, self.divisor)
        x, mask, valid = stacked[:-2], stacked[-2] > 0.5, stacked[-1] > 0.5
        masked = ("zscore_foreground", "zscore_masked", "minmax", "percentile")
        stats_on = mask & valid if self.intensity in masked else valid
        # padding holds raw 0 (air): it is normalised like the air of the volume, never counted in the stats
        x = normalize_intensity(x, stats_on, self)
        return x[None].contiguous().float()

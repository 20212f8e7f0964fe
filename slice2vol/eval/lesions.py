"""Simulated lesions drawn into real healthy volumes, for the anomaly-detection probe.

A lesion is a soft-edged, randomly rotated ellipsoid inside the brain whose voxels are multiplied
by ``1 + c`` (``c < 0``: T1-hypointense, like most white-matter lesions and infarcts; ``c > 0``:
hyperintense, like some haemorrhages or contrast-enhancing lesions). Only brain voxels change
(the segmentation's non-zero voxels, else the head mask), intensities stay in [0, 1], and the edge
is blended over about one voxel (Gaussian, sigma 0.7 voxel, cut below 1% of the contrast) so that
no artificial step edge gives the lesion away. ``contrast`` is the change at the lesion's core; the
rim changes less.

The ranges (:class:`LesionConfig`) are those of the main setting of the benchmark; a difficulty
sweep (:func:`sweep_settings`) draws exactly one lesion of a fixed radius and contrast
magnitude per scan, so the report can show at which size and contrast each encoder stops seeing
lesions. Every draw is seeded by ``(seed, setting, subject)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class LesionConfig:
    """Attributes:
    n_lesions: (min, max) lesions per volume.
    radius_mm: (min, max) semi-axis length; each of the three semi-axes is drawn in this range.
    contrast: (min, max) of ``|c|``, the relative intensity change inside the lesion.
    sign: ``random`` (hypo- or hyperintense with equal probability), ``hypo`` or ``hyper``.
    erode: voxels the brain mask is eroded by before centres are drawn (keeps lesions inside).
    edge_sigma: Gaussian blur of the lesion mask in voxels (soft edge).
    """

    n_lesions: tuple[int, int] = (1, 3)
    radius_mm: tuple[float, float] = (5.0, 12.0)
    contrast: tuple[float, float] = (0.3, 0.6)
    sign: str = "random"
    erode: int = 3
    edge_sigma: float = 0.7

    def __post_init__(self) -> None:
        if self.sign not in ("random", "hypo", "hyper"):
            raise ValueError(f"lesion sign must be random, hypo or hyper, got {self.sign!r}")
        if not 1 <= self.n_lesions[0] <= self.n_lesions[1]:
            raise ValueError(f"n_lesions must be 1 <= min <= max, got {self.n_lesions}")
        if not 0 < self.radius_mm[0] <= self.radius_mm[1]:
            raise ValueError(f"radius_mm must be 0 < min <= max, got {self.radius_mm}")
        if not 0 <= self.contrast[0] <= self.contrast[1]:
            raise ValueError(f"contrast must be 0 <= min <= max, got {self.contrast}")


@dataclass
class SweepConfig:
    """The difficulty sweep: one lesion per scan at every (contrast, radius) pair.

    Attributes:
        contrasts: ``|c|`` values (relative intensity change).
        radii_mm: semi-axis lengths (all three equal: a sphere).
        sign: as :attr:`LesionConfig.sign`.
    """

    contrasts: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4])
    radii_mm: list[float] = field(default_factory=lambda: [3.0, 5.0, 8.0])
    sign: str = "hypo"


def sweep_settings(sweep: SweepConfig) -> list[tuple[str, LesionConfig]]:
    """(name, config) for every (contrast, radius) pair, weakest first; name ``c0.20-r5mm``."""
    out = []
    for c in sweep.contrasts:
        for r in sweep.radii_mm:
            out.append((f"c{c:.2f}-r{r:g}mm", LesionConfig(n_lesions=(1, 1), radius_mm=(r, r), contrast=(c, c),
                                                          sign=sweep.sign)))
    return out


def brain_mask(volume) -> np.ndarray:
    """(X, Y, Z) bool: the segmentation's non-zero voxels if there is one, else the head mask."""
    if volume.seg is not None and (volume.seg > 0).any():
        return volume.seg > 0
    return volume.mask


def lesion_centres(volume, erode: int) -> np.ndarray:
    """(M, 3) voxel positions a lesion centre may be drawn from: the brain eroded by ``erode``
    voxels (the whole brain when nothing survives the erosion)."""
    from scipy.ndimage import binary_erosion

    brain = brain_mask(volume)
    inner = binary_erosion(brain, iterations=erode) if erode else brain
    return np.argwhere(inner if inner.any() else brain)


class LesionSampler:
    """Draws many lesion sets into one volume (:func:`simulate_lesions`), eroding its brain mask once
    per ``erode`` setting instead of once per draw (the erosion is most of the cost of a draw).

    Example:
        >>> sampler = LesionSampler(volume)
        >>> sick, lesion = sampler.draw(np.random.default_rng([0, 7]), LesionConfig())
    """

    def __init__(self, volume) -> None:
        self.volume = volume
        self._centres: dict[int, np.ndarray] = {}

    def draw(self, rng: np.random.Generator, cfg: LesionConfig | None = None):
        cfg = cfg or LesionConfig()
        if cfg.erode not in self._centres:
            self._centres[cfg.erode] = lesion_centres(self.volume, cfg.erode)
        return simulate_lesions(self.volume, rng, cfg, centres=self._centres[cfg.erode])


def simulate_lesions(volume, rng: np.random.Generator, cfg: LesionConfig | None = None,
                     centres: np.ndarray | None = None):
    """Draws soft-edged ellipsoidal lesions into a copy of a healthy volume.

    Each lesion has three semi-axes drawn in ``radius_mm``, a random rotation, a centre drawn
    uniformly among the brain voxels eroded by ``erode``, and multiplies intensities by ``1 + c``
    with ``|c|`` drawn in ``contrast`` and the sign from ``sign``. Voxels outside the brain are not
    changed; the input volume is not modified.

    Args:
        volume: :class:`~slice2vol.data.io.Volume` with data (C, X, Y, Z) in [0, 1].
        rng: seeded generator.
        centres: :func:`lesion_centres` of this volume for ``cfg.erode``, when the caller draws many
            lesion sets into one volume (the erosion is most of the cost of a draw).

    Returns:
        (lesioned Volume, lesion mask (X, Y, Z) bool: voxels more than half inside a lesion, or,
        when none is, the strongest voxel of a lesion of at least half a voxel's volume). The
        lesioned volume's ``maps["sim_lesion"]`` holds the mask as uint8.
    """
    from scipy.ndimage import gaussian_filter

    cfg = cfg or LesionConfig()
    brain = brain_mask(volume)
    candidates = lesion_centres(volume, cfg.erode) if centres is None else centres
    if not len(candidates):
        raise ValueError(f"{volume.subject_id}: no brain voxels to place a lesion in")
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    data = volume.data.astype(np.float32, copy=True)
    lesion = np.zeros(volume.shape, dtype=bool)
    n_lesions = int(rng.integers(cfg.n_lesions[0], cfg.n_lesions[1] + 1))
    for _ in range(n_lesions):
        centre = candidates[rng.integers(len(candidates))]
        radii_mm = rng.uniform(cfg.radius_mm[0], cfg.radius_mm[1], size=3)
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        magnitude = rng.uniform(cfg.contrast[0], cfg.contrast[1])
        sign = {"hypo": -1.0, "hyper": 1.0}.get(cfg.sign) or float(rng.choice([-1.0, 1.0]))
        # work in a box around the lesion: the ellipsoid plus room for the blurred edge
        reach = np.ceil(radii_mm.max() / spacing + 3 * cfg.edge_sigma + 2).astype(int)
        lo = np.maximum(centre - reach, 0)
        hi = np.minimum(centre + reach + 1, volume.shape)
        axes = [np.arange(a, b) for a, b in zip(lo, hi)]
        offsets = np.stack(np.meshgrid(*axes, indexing="ij"), -1).astype(np.float64) - centre
        local = (offsets * spacing) @ q  # rotated offsets in mm
        inside = (((local / radii_mm) ** 2).sum(-1) <= 1).astype(np.float32)
        soft = gaussian_filter(inside, cfg.edge_sigma) if cfg.edge_sigma > 0 else inside
        # cut the Gaussian tail: changes below 1% of the lesion contrast would only make more
        # slices "changed" (re-embedded) without being visible
        soft[soft < 0.01] = 0.0
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        soft = soft * brain[box]
        data[(slice(None),) + box] *= 1 + sign * magnitude * soft[None]
        core = soft > 0.5
        if not core.any() and soft.max() > 0 and 4 / 3 * np.pi * radii_mm.prod() >= 0.5 * spacing.prod():
            # a lesion about one voxel across: the blur spreads it below half contrast everywhere
            # (a 4 mm sphere on a 4 mm grid, which holds its whole centre voxel); at least half a
            # voxel of lesion makes the voxel where it is strongest the lesion, so a difficulty
            # sweep's smallest radius scores a lesion instead of failing the draw
            core = soft == soft.max()
        lesion[box] |= core
    # both ends were found late as numpy errors or NaN AUROCs: no lesion voxel gives nothing to detect
    # ("cannot reshape array of size 0"), a lesion filling the brain leaves no healthy voxel to compare
    shown = "x".join(f"{v:.3g}" for v in spacing)
    if not lesion.any():
        raise ValueError(f"{volume.subject_id}: the simulated lesions (radius_mm {list(cfg.radius_mm)}) cover no "
                         f"voxel of this {shown} mm grid; use radii of at least about one voxel")
    if not (brain & ~lesion).any():
        raise ValueError(f"{volume.subject_id}: the simulated lesions (radius_mm {list(cfg.radius_mm)}) cover the "
                         "whole brain, leaving no healthy voxel to compare with; use smaller radii")
    np.clip(data, 0, 1, out=data)
    return dataclasses.replace(volume, data=data, maps={**volume.maps, "sim_lesion": lesion.astype(np.uint8)}), lesion


def changed_slices(healthy: np.ndarray, lesioned: np.ndarray, axis: int) -> np.ndarray:
    """Indices along ``axis`` (0-2 of (X, Y, Z)) of the slices whose intensities differ, sorted.

    Args:
        healthy, lesioned: (C, X, Y, Z) volume data.
    """
    diff = np.abs(lesioned - healthy).max(0) > 0
    return np.flatnonzero(diff.any(axis=tuple(a for a in range(3) if a != axis)))


def central_slice(lesion: np.ndarray, axis: int) -> int:
    """The slice along ``axis`` holding the most lesion voxels."""
    counts = lesion.sum(axis=tuple(a for a in range(3) if a != axis))
    return int(np.argmax(counts))


def lesion_components(lesion: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components (26-connectivity) of a lesion mask: (labels (X, Y, Z), count)."""
    from scipy.ndimage import label

    labels, n = label(lesion, structure=np.ones((3, 3, 3), dtype=bool))
    return labels, int(n)


def describe(cfg: LesionConfig, spacing: Sequence[float] | None = None) -> str:
    """One line for reports: 'n 1-3, semi-axes 5-12 mm, |contrast| 0.30-0.60, hypo or hyper'."""
    sign = {"random": "hypo- or hyperintense", "hypo": "hypointense", "hyper": "hyperintense"}[cfg.sign]
    text = (f"{cfg.n_lesions[0]}-{cfg.n_lesions[1]} lesion(s), semi-axes {cfg.radius_mm[0]:g}-{cfg.radius_mm[1]:g} mm, "
            f"|contrast| {cfg.contrast[0]:.2f}-{cfg.contrast[1]:.2f}, {sign}")
    if spacing is not None:
        text += f" (voxels {'x'.join(f'{s:g}' for s in spacing)} mm)"
    return text

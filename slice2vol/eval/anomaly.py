"""Lesion-scale anomaly detection: a PatchCore-style memory bank of healthy patches.

Do an encoder's dense features notice what is not healthy anatomy? Lesions are simulated in real
held-out healthy scans (:mod:`slice2vol.eval.lesions`); per fold, the brain patches of the healthy
*training* subjects form a memory bank (per-subject k-centre coresets, :func:`subject_patches`;
standardised; optionally position-aware), and every patch of a held-out scan is scored by its
distance to the nearest bank patch (faiss, exact L2: :class:`PatchMemoryBank`). Patch scores are
upsampled to voxels on the volume's own grid (:func:`cells_to_volume`) and scored at four levels:
pixel (voxel AUROC inside the brain), region (lesion-wise detection at a fixed voxel
false-positive rate on healthy scans), slice (lesion-cutting slices against the same healthy
slices) and subject (pooled AUROC, and each lesioned scan against its own healthy scan).

The cross-validation loop lives in :func:`slice2vol.eval.dense_bench.anomaly_cv`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from slice2vol.eval.dense_bench import DenseFeatureConfig
from slice2vol.eval.lesions import LesionConfig, SweepConfig

if TYPE_CHECKING:  # annotations only: torch is imported where the maps are computed
    import torch


@dataclass
class PatchScorerConfig:
    """Attributes:
    levels: feature levels (:func:`slice2vol.eval.dense.select_levels` selectors); the finest
        sets the patch grid, deeper ones are upsampled to it (PatchCore: layer2 + layer3).
    pool: local neighbourhood aggregation, a ``pool x pool`` average over each level (PatchCore's
        3x3), so a patch feature describes its surroundings.
    dilate: cells within this many cells of a brain voxel are banked (healthy training scans) and
        scored (test scans); the same selection on both sides, so brain-boundary patches (brain
        plus skull) are compared with brain-boundary patches.
    per_subject: coreset size kept per healthy training subject (k-centre greedy); a fold's bank
        is the union of its training subjects' coresets (the union of k-centre coresets covers the
        union of the sets within the largest per-subject radius).
    presample: the coreset of a subject is chosen among at most this many of its cells (random).
    proj_dim: random-projection width for the coreset selection (PatchCore's Johnson-Lindenstrauss
        trick), 0 for none.
    k: neighbours averaged for the score (PatchCore: 1).
    position_weight: appended cell coordinates are multiplied by this before the nearest-neighbour
        search, in standardised-feature units per coordinate unit; > 0 makes the bank
        position-aware (a patch is compared with healthy patches from about the same place, which
        helps when slices are roughly aligned across subjects), 0 is plain PatchCore.
    position_frame: ``brain`` (coordinates 0-100 across the brain's bounding box, so that heads of
        other sizes and placements line up) or ``mm``.
    subject_score: ``max`` of voxel scores over the brain, or ``top:N`` (mean of the N highest).
    bank_size: a fold's bank (the union of the per-subject coresets, ``per_subject`` x training
        subjects) is reduced to at most this many patches by one more k-centre greedy pass over
        the standardised, position-weighted bank (PatchCore's coreset of the pooled memory bank);
        None keeps the union. A fixed size makes scoring cost grow linearly with the cohort
        instead of quadratically (every held-out cell is searched against the bank).
    """

    levels: list = field(default_factory=lambda: ["stride:8", "stride:16"])
    pool: int = 3
    dilate: int = 1
    per_subject: int = 200
    presample: int = 20000
    proj_dim: int = 64
    k: int = 1
    position_weight: float = 0.0
    position_frame: str = "brain"
    subject_score: str = "max"
    bank_size: int | None = None

    def __post_init__(self) -> None:
        # checked here: per_subject=0 ended the run in an IndexError inside the coreset selection,
        # after every set's dense features were extracted
        from slice2vol.config import check_real, check_whole

        where = "anomaly.scorer"
        if not isinstance(self.levels, (list, tuple)) or not self.levels:
            raise ValueError(f"{where}.levels must be a non-empty list of levels, got {self.levels!r}")
        for name, low in (("pool", 1), ("dilate", 0), ("per_subject", 1), ("presample", 1), ("proj_dim", 0),
                          ("k", 1)):
            check_whole(f"{where}.{name}", getattr(self, name), low)
        check_whole(f"{where}.bank_size", self.bank_size, 1, none_ok=True)
        check_real(f"{where}.position_weight", self.position_weight, 0.0)
        if self.position_frame not in ("brain", "mm"):
            raise ValueError(f"{where}.position_frame must be brain or mm, got {self.position_frame!r}")
        how = str(self.subject_score)
        if not (how == "max" or (how.startswith("top:") and how[4:].isdigit() and int(how[4:]) >= 1)):
            raise ValueError(f"{where}.subject_score must be 'max' or 'top:N' with N >= 1, got {self.subject_score!r}")


@dataclass
class AnomalyConfig:
    """The ``anomaly:`` block of an experiment.

    Attributes:
        features: dense feature extraction; None = the segmentation block's (then both probes read
            the same feature files).
        scorer: the patch scorer (:class:`PatchScorerConfig`) of every 2D encoder.
        variants: name -> overrides of ``scorer`` fields; each variant is scored (e.g. plain
            PatchCore and a position-aware bank); the first is the primary one.
        lesions: the main lesion setting (:class:`~slice2vol.eval.lesions.LesionConfig`).
        sweep: the difficulty sweep (:class:`~slice2vol.eval.lesions.SweepConfig`), None for none.
        fpr: voxel false-positive rate on held-out healthy scans for the lesion-wise detection threshold.
        min_lesion_voxels: a slice cuts a lesion (slice-level positive) with at least this many voxels.
        n_folds: subject-level folds.
        encoders: names of the experiment's 2D encoders to score (None: all).
        twins: add the random-init twin of every pretrained encoder that has none in the list.
        controls: name -> :class:`~slice2vol.eval.dense.IntensityFeatures` keywords (the positive
            control: raw intensity patches through the same scorer).
        max_subjects: use at most this many subjects, None for all.
        seed: lesion placement seed (lesions are the same for every set).
    """

    features: DenseFeatureConfig | None = None
    scorer: PatchScorerConfig = field(default_factory=lambda: PatchScorerConfig())
    variants: dict = field(default_factory=lambda: {"patchcore": {}})
    lesions: LesionConfig = field(default_factory=LesionConfig)
    sweep: SweepConfig | None = field(default_factory=SweepConfig)
    fpr: float = 0.01
    min_lesion_voxels: int = 5
    n_folds: int = 4
    encoders: list[str] | None = None
    twins: bool = True
    controls: dict = field(default_factory=lambda: {"intensity": {"patch": 3, "stride": 4, "coords": False}})
    max_subjects: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        from slice2vol.config import check_real, check_whole

        check_real("anomaly.fpr", self.fpr, 0.0, 1.0, low_open=True, high_open=True)
        check_whole("anomaly.min_lesion_voxels", self.min_lesion_voxels, 1)
        check_whole("anomaly.n_folds", self.n_folds, 2)
        check_whole("anomaly.max_subjects", self.max_subjects, 0, none_ok=True)  # 0: all
        if not isinstance(self.variants, dict) or not self.variants:
            raise ValueError(f"anomaly.variants must name at least one variant (name: {{overrides}}), "
                             f"got {self.variants!r}")
        if self.lesions.contrast[1] <= 0:
            raise ValueError(f"anomaly.lesions.contrast must reach above 0 (lesions that change no voxel cannot "
                             f"be detected), got {list(self.lesions.contrast)}")


# -- patch-level anomaly scoring (PatchCore-style) ----------------------------------------------
def patch_maps(ds, cfg: PatchScorerConfig, rows: np.ndarray | None = None,
               levels: Sequence[int] | None = None) -> "torch.Tensor":
    """Patch features (S, D, gh, gw) on the grid of the finest chosen level.

    Args:
        ds: :class:`~slice2vol.eval.dense.DenseSlices`.
        levels: positions into ``ds.levels`` (default: all of them).
    """
    import torch
    import torch.nn.functional as F

    js = list(range(len(ds.levels))) if levels is None else list(levels)
    finest = min(js, key=lambda j: ds.levels[j].stride)
    grid = ds.maps[finest].shape[-2:]
    out = []
    for j in js:
        fmap = ds.level(j, rows)
        if cfg.pool > 1:
            fmap = F.avg_pool2d(fmap, cfg.pool, stride=1, padding=cfg.pool // 2, count_include_pad=False)
        if tuple(fmap.shape[-2:]) != tuple(grid):
            fmap = F.interpolate(fmap, size=tuple(grid), mode="bilinear", align_corners=False)
        out.append(fmap)
    return torch.cat(out, 1) if out else torch.zeros(0)


def cell_brain_fraction(ds, grid: tuple[int, int], rows: np.ndarray | None = None) -> np.ndarray:
    """(S, gh, gw) fraction of each cell's box pixels that are brain (``ds.mask``)."""
    import torch
    import torch.nn.functional as F

    top, left, h, w = ds.box
    mask = ds.mask if rows is None else ds.mask[rows]
    crop = torch.from_numpy(mask[:, top:top + h, left:left + w].astype(np.float32))[:, None]
    return F.adaptive_avg_pool2d(crop, grid)[:, 0].numpy()


def scored_cells(ds, grid: tuple[int, int], dilate: int = 1, rows: np.ndarray | None = None) -> np.ndarray:
    """(S, gh, gw) bool: cells touching the brain, dilated in-plane by ``dilate`` cells."""
    from scipy.ndimage import binary_dilation

    near = cell_brain_fraction(ds, grid, rows) > 0
    if dilate and near.any():
        near = binary_dilation(near, structure=np.ones((1, 3, 3), bool), iterations=dilate)
    return near


def cell_positions(ds, grid: tuple[int, int], rows: np.ndarray | None = None, frame: str = "mm") -> np.ndarray:
    """(S, gh, gw, 3) cell centres: (through-plane, in-plane row, in-plane column).

    Args:
        frame: ``mm`` (millimetres from the first slice and the top-left of the volume's slice) or
            ``brain`` (0-100 along each axis of the brain's bounding box, ``ds.brain_box``: heads
            placed or sized differently in the field of view line up).
    """
    from slice2vol.data.slicing import _IN_PLANE, PLANES

    top, left, h, w = ds.box
    gh, gw = grid
    ct, cl, ch, cw = ds.content_box
    r_axis, c_axis = _IN_PLANE[ds.plane]
    mm_r = ds.grid_shape[0] * ds.spacing[r_axis] / ch
    mm_c = ds.grid_shape[1] * ds.spacing[c_axis] / cw
    ys = (top + (np.arange(gh) + 0.5) * h / gh - ct) * mm_r
    xs = (left + (np.arange(gw) + 0.5) * w / gw - cl) * mm_c
    idx = ds.indices if rows is None else ds.indices[rows]
    zs = idx * ds.spacing[PLANES[ds.plane]]
    out = np.empty((len(idx), gh, gw, 3), dtype=np.float32)
    out[..., 0] = zs[:, None, None]
    out[..., 1] = ys[None, :, None]
    out[..., 2] = xs[None, None, :]
    if frame == "brain":
        if ds.brain_box is None:
            raise ValueError("brain-frame positions need the brain's bounding box (no brain or head mask)")
        box = np.asarray(ds.brain_box, dtype=np.float64).reshape(3, 2)
        out = ((out - box[:, 0]) / np.maximum(box[:, 1] - box[:, 0], 1e-6) * 100).astype(np.float32)
    elif frame != "mm":
        raise ValueError(f"position frame must be mm or brain, got {frame!r}")
    return out


def greedy_coreset(x: np.ndarray, m: int, proj_dim: int = 64, seed: int = 0) -> np.ndarray:
    """Indices of ``m`` rows of ``x`` (N, D) chosen by k-centre greedy (PatchCore's coreset).

    Each step adds the row farthest from those already chosen, so the chosen rows cover ``x``
    with the smallest radius a greedy choice can give (within 2x of the optimum). Distances are
    taken after a Gaussian random projection to ``proj_dim`` dimensions (cheaper, distances kept
    up to a small factor). The first row is drawn at random.
    """
    import torch

    n = len(x)
    if m >= n:
        return np.arange(n)
    gen = torch.Generator().manual_seed(seed)
    z = torch.as_tensor(np.asarray(x, np.float32))
    if proj_dim and proj_dim < z.shape[1]:
        z = z @ (torch.randn(z.shape[1], proj_dim, generator=gen) / proj_dim ** 0.5)
    norms = (z * z).sum(1)
    chosen = np.empty(m, dtype=np.int64)
    chosen[0] = int(torch.randint(n, (1,), generator=gen))
    # squared distances as |z|^2 - 2 z.c + |c|^2: one matrix-vector product per step, no (N, d) temporaries
    dist = norms - 2 * (z @ z[chosen[0]]) + norms[chosen[0]]
    for i in range(1, m):
        nxt = int(torch.argmax(dist))
        chosen[i] = nxt
        torch.minimum(dist, norms - 2 * (z @ z[nxt]) + norms[nxt], out=dist)
    return chosen


@dataclass
class SubjectPatches:
    """One healthy subject's contribution to memory banks: its coreset and its feature statistics.

    Attributes:
        features: (M, D) float32 coreset patch features (raw, not standardised).
        positions: (M, 3) float32 cell centres in mm.
        count, total, total_sq: number of brain cells and per-dimension sums over ALL of them
            (exact standardisation statistics of a fold's training subjects, not the coreset's).
    """

    features: np.ndarray
    positions: np.ndarray
    count: int
    total: np.ndarray
    total_sq: np.ndarray


def subject_patches(ds, cfg: PatchScorerConfig, seed: int = 0) -> SubjectPatches:
    """Brain patches (:func:`scored_cells`) of one healthy subject reduced to a k-centre coreset of
    ``cfg.per_subject``.

    The coreset is chosen in the subject's own standardised space (so no feature dominates by
    scale) with the cell positions appended as the bank will see them.
    """
    feats = patch_maps(ds, cfg)                                            # (S, D, gh, gw)
    grid = tuple(feats.shape[-2:])
    keep = scored_cells(ds, grid, cfg.dilate)
    x = feats.permute(0, 2, 3, 1).numpy()[keep].astype(np.float64)         # (N, D)
    pos = cell_positions(ds, grid, frame=cfg.position_frame)[keep]
    total, total_sq, count = x.sum(0), (x ** 2).sum(0), len(x)
    if len(x) > cfg.presample:  # the coreset is chosen among a random subset (statistics use every cell)
        pick = np.sort(np.random.default_rng(seed).choice(len(x), cfg.presample, replace=False))
        x, pos = x[pick], pos[pick]
    if len(x) == 0:
        d = feats.shape[1]
        return SubjectPatches(np.zeros((0, d), np.float32), np.zeros((0, 3), np.float32), 0, np.zeros(d), np.zeros(d))
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > std.max() * 1e-6, std, 1.0)
    z = (x - mean) / std
    if cfg.position_weight > 0:
        z = np.concatenate([z, cfg.position_weight * pos], 1)
    idx = greedy_coreset(z.astype(np.float32), cfg.per_subject, cfg.proj_dim, seed)
    return SubjectPatches(x[idx].astype(np.float32), pos[idx].astype(np.float32), count, total, total_sq)


class PatchMemoryBank:
    """Nearest-neighbour distance of patch features to a bank of healthy patches (faiss, exact L2).

    Features are standardised with the statistics of every brain patch of the training subjects;
    with ``position_weight > 0`` the cell position (mm) is appended, weighted, so that the nearest
    healthy patch is sought near the same place.
    """

    def __init__(self, cfg: PatchScorerConfig | None = None) -> None:
        self.cfg = cfg or PatchScorerConfig()

    def fit(self, parts: Sequence[SubjectPatches]) -> "PatchMemoryBank":
        import faiss

        count = sum(p.count for p in parts)
        if count == 0:
            raise ValueError("no healthy brain patches to build a memory bank from")
        total = np.sum([p.total for p in parts], 0)
        total_sq = np.sum([p.total_sq for p in parts], 0)
        self.mean_ = total / count
        var = np.maximum(total_sq / count - self.mean_ ** 2, 0)
        std = np.sqrt(var)
        self.std_ = np.where(std > std.max() * 1e-6, std, 1.0)
        bank = self._embed(np.concatenate([p.features for p in parts]), np.concatenate([p.positions for p in parts]))
        if self.cfg.bank_size and len(bank) > self.cfg.bank_size:
            bank = bank[np.sort(greedy_coreset(bank, int(self.cfg.bank_size), self.cfg.proj_dim, seed=len(bank)))]
        self.index_ = faiss.IndexFlatL2(bank.shape[1])
        self.index_.add(bank)
        return self

    def _embed(self, x: np.ndarray, pos: np.ndarray | None) -> np.ndarray:
        z = (np.asarray(x, np.float64) - self.mean_) / self.std_
        if self.cfg.position_weight > 0:
            if pos is None:
                raise ValueError("a position-aware bank needs the query positions")
            z = np.concatenate([z, self.cfg.position_weight * np.asarray(pos, np.float64)], 1)
        return np.ascontiguousarray(z, dtype=np.float32)

    def score(self, x: np.ndarray, pos: np.ndarray | None = None) -> np.ndarray:
        """(N, D) patch features (and (N, 3) positions) -> (N,) mean distance to the k nearest."""
        if len(x) == 0:
            return np.zeros(0, np.float32)
        sq, _ = self.index_.search(self._embed(x, pos), min(self.cfg.k, self.index_.ntotal))
        return np.sqrt(np.maximum(sq, 0)).mean(1).astype(np.float32)

    def score_cells(self, ds, rows: np.ndarray | None = None) -> np.ndarray:
        """(S, gh, gw) patch scores of the slices ``rows``; only :func:`scored_cells` are searched,
        the others are 0 (they touch no brain voxel when upsampled)."""
        feats = patch_maps(ds, self.cfg, rows)
        grid = tuple(feats.shape[-2:])
        near = scored_cells(ds, grid, self.cfg.dilate, rows)
        out = np.zeros(near.shape, np.float32)
        if near.any():
            x = feats.permute(0, 2, 3, 1).numpy()[near]
            pos = (cell_positions(ds, grid, rows, self.cfg.position_frame)[near] if self.cfg.position_weight > 0
                   else None)
            out[near] = self.score(x, pos)
        return out


def cells_to_volume(cells: np.ndarray, ds, volume_shape: Sequence[int], rows: np.ndarray | None = None) -> np.ndarray:
    """(S, gh, gw) cell scores -> (X, Y, Z) float32 voxel scores (bilinear; absent slices 0)."""
    import torch
    import torch.nn.functional as F

    from slice2vol.data.slicing import slices_to_grid

    top, left, h, w = ds.box
    maps = F.interpolate(torch.from_numpy(cells)[:, None], size=(h, w), mode="bilinear", align_corners=False)
    full = maps.new_zeros((len(cells), 1, ds.slice_size, ds.slice_size))
    full[:, :, top:top + h, left:left + w] = maps
    return slices_to_grid(full, ds.plane_slices(rows), volume_shape)[0].numpy()


def subject_score(scores: np.ndarray, brain: np.ndarray, how: str = "max") -> float:
    """One anomaly score per scan from voxel scores inside the brain: ``max`` or ``top:N`` mean."""
    vals = scores[brain]
    if len(vals) == 0:
        return float("nan")
    if how == "max":
        return float(vals.max())
    if how.startswith("top:"):
        n = min(int(how[4:]), len(vals))
        return float(np.partition(vals, len(vals) - n)[-n:].mean())
    raise ValueError(f"subject_score must be 'max' or 'top:N', got {how!r}")


# -- anomaly metrics ----------------------------------------------------------------------------
def voxel_auroc(scores: np.ndarray, lesion: np.ndarray, brain: np.ndarray) -> float:
    """AUROC of voxel scores inside ``brain``: lesion voxels against every other brain voxel."""
    from slice2vol.eval.metrics import _binary_auc

    return _binary_auc(lesion[brain].astype(bool), scores[brain])


class BinnedAUROC:
    """Pooled AUROC over many scans from per-scan score histograms, for cheap subject bootstraps.

    Scores are binned on fixed ``edges``; a scan contributes a histogram of positives and one of
    negatives, so a bootstrap over scans sums histograms instead of ranking millions of voxels.
    With fine bins (default 2,000 quantile edges) the AUROC matches the exact value within the
    ties the binning creates (counted half).
    """

    def __init__(self, edges: np.ndarray) -> None:
        self.edges = np.asarray(edges, dtype=np.float64)

    @classmethod
    def from_samples(cls, samples: np.ndarray, n_bins: int = 2000) -> "BinnedAUROC":
        edges = np.unique(np.quantile(np.asarray(samples, np.float64), np.linspace(0, 1, n_bins + 1)))
        return cls(edges)

    def histogram(self, scores: np.ndarray) -> np.ndarray:
        idx = np.clip(np.searchsorted(self.edges, scores, side="right") - 1, 0, len(self.edges) - 1)
        return np.bincount(idx, minlength=len(self.edges)).astype(np.float64)

    @staticmethod
    def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
        """AUROC from (bins,) histograms of positives and negatives (ties within a bin count half)."""
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        below = np.cumsum(neg) - neg
        return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def lesion_detection(scores: np.ndarray, lesion: np.ndarray, threshold: float) -> tuple[int, int]:
    """Lesion-wise detection: (lesions whose highest voxel score exceeds ``threshold``, lesions).

    Lesions are the connected components of ``lesion``; the threshold is set on healthy scans
    (e.g. the 99th percentile of their brain voxel scores: 1% voxel false-positive rate).
    """
    from scipy.ndimage import maximum

    from slice2vol.eval.lesions import lesion_components

    if not lesion.any():
        return 0, 0
    # label inside the lesions' bounding box: the same components, far less work than the volume
    where = np.argwhere(lesion)
    box = tuple(slice(lo, hi + 1) for lo, hi in zip(where.min(0), where.max(0)))
    labels, n = lesion_components(lesion[box])
    peaks = np.asarray(maximum(scores[box], labels, index=np.arange(1, n + 1)))
    # strictly above: at most ``fpr`` of healthy voxels exceed their quantile, while a tie may hold far more
    # of them -- a constant score map (a collapsed encoder) must detect nothing, not every lesion
    return int((peaks > threshold).sum()), n


def paired_rank_fraction(healthy: np.ndarray, lesioned: np.ndarray, n_boot: int = 1000,
                         seed: int = 0) -> tuple[float, float, float]:
    """Fraction of subjects whose lesioned scan scores above their own healthy scan (ties half),
    with a subject-level percentile bootstrap 95% interval: (estimate, low, high)."""
    h, s = np.asarray(healthy, np.float64), np.asarray(lesioned, np.float64)
    ok = np.isfinite(h) & np.isfinite(s)
    wins = (s[ok] > h[ok]).astype(np.float64) + 0.5 * (s[ok] == h[ok])
    if len(wins) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = wins[rng.integers(0, len(wins), (n_boot, len(wins)))].mean(1)
    return float(wins.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))

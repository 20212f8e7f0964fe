"""Anomaly detection on simulated lesions: do embeddings notice what is not healthy anatomy?

Lesions are drawn into real held-out healthy volumes (1-3 soft-edged ellipsoids inside the brain,
random size, location and contrast, hypo- or hyperintense); scorers are fitted on the embeddings of
healthy *training* subjects only and score held-out subjects before and after the lesions were
added. Subject-level AUROC compares the two; when slices are embedded, slice-level AUROC asks
whether the slices that cut a lesion score higher than those that do not.

Scorers follow scikit-learn conventions (``fit(x)`` returns self, ``score(x)``: higher = more
anomalous): :class:`KNNDistance` (mean distance to the k nearest healthy rows, standardised),
:class:`Mahalanobis` (Ledoit-Wolf shrunk covariance of standardised rows, since N << D) and
:class:`OneClassSVMScorer` (RBF one-class SVM).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from slice2vol.eval.dense_bench import DenseFeatureConfig
from slice2vol.eval.lesions import LesionConfig, SweepConfig
from slice2vol.eval.linear import _Standardizer


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
    position_weight: appended cell coordinates (mm) are multiplied by this before the
        nearest-neighbour search, in standardised-feature units per mm; > 0 makes the bank
        position-aware (a patch is compared with healthy patches from about the same place, which
        helps when slices are roughly aligned across subjects), 0 is plain PatchCore.
    subject_score: ``max`` of voxel scores over the brain, or ``top:N`` (mean of the N highest).
    """

    levels: list = field(default_factory=lambda: ["stride:8", "stride:16"])
    pool: int = 3
    dilate: int = 1
    per_subject: int = 200
    presample: int = 20000
    proj_dim: int = 64
    k: int = 1
    position_weight: float = 0.0
    subject_score: str = "max"


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
        scorers, knn_k, n_lesions, radius_mm, contrast, plane, stride, size: settings of the previous
            whole-volume scorers, read only by the old runner code.
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
    scorers: tuple[str, ...] = ("knn", "mahalanobis", "ocsvm")
    knn_k: int = 5
    n_lesions: tuple[int, int] = (1, 3)
    radius_mm: tuple[float, float] = (5.0, 12.0)
    contrast: tuple[float, float] = (0.3, 0.6)
    plane: str = "axial"
    stride: int = 4
    size: int = 112


class KNNDistance:
    """Mean Euclidean distance to the ``k`` nearest healthy training rows, in standardised space.

    Standardising with healthy statistics first keeps one high-variance dimension from dominating;
    Euclidean (not cosine) distance, because a lesion may move an embedding along its own direction.
    """

    def __init__(self, k: int = 5) -> None:
        self.k = k

    def fit(self, x: np.ndarray) -> "KNNDistance":
        import faiss

        x = np.asarray(x, dtype=np.float64)
        self.scaler_ = _Standardizer().fit(x)
        train = np.ascontiguousarray(self.scaler_.transform(x), dtype=np.float32)
        self.index_ = faiss.IndexFlatL2(train.shape[1])
        self.index_.add(train)
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        query = np.ascontiguousarray(self.scaler_.transform(np.asarray(x, dtype=np.float64)), dtype=np.float32)
        sq, _ = self.index_.search(query, min(self.k, self.index_.ntotal))
        return np.sqrt(np.maximum(sq, 0)).mean(1)


class Mahalanobis:
    """Squared Mahalanobis distance under a Ledoit-Wolf covariance of standardised healthy rows."""

    def fit(self, x: np.ndarray) -> "Mahalanobis":
        from sklearn.covariance import LedoitWolf

        x = np.asarray(x, dtype=np.float64)
        self.scaler_ = _Standardizer().fit(x)
        self.cov_ = LedoitWolf().fit(self.scaler_.transform(x))
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.cov_.mahalanobis(self.scaler_.transform(np.asarray(x, dtype=np.float64)))


class OneClassSVMScorer:
    """RBF one-class SVM on standardised rows; score = minus the decision function."""

    def __init__(self, nu: float = 0.1) -> None:
        self.nu = nu

    def fit(self, x: np.ndarray) -> "OneClassSVMScorer":
        from sklearn.svm import OneClassSVM

        x = np.asarray(x, dtype=np.float64)
        self.scaler_ = _Standardizer().fit(x)
        self.svm_ = OneClassSVM(nu=self.nu, gamma="scale").fit(self.scaler_.transform(x))
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        return -self.svm_.decision_function(self.scaler_.transform(np.asarray(x, dtype=np.float64)))


def build_scorer(name: str, cfg: AnomalyConfig | None = None):
    cfg = cfg or AnomalyConfig()
    if name == "knn":
        return KNNDistance(cfg.knn_k)
    if name == "mahalanobis":
        return Mahalanobis()
    if name == "ocsvm":
        return OneClassSVMScorer()
    raise KeyError(f"unknown anomaly scorer {name!r}; known: knn, mahalanobis, ocsvm")


def brain_mask(volume) -> np.ndarray:
    """(X, Y, Z) bool: the segmentation's non-zero voxels if there is one, else the head mask."""
    if volume.seg is not None and (volume.seg > 0).any():
        return volume.seg > 0
    return volume.mask


def simulate_lesions(volume, rng: np.random.Generator, cfg: AnomalyConfig | None = None):
    """Draws soft-edged ellipsoidal lesions into a copy of a healthy volume.

    Each lesion has random semi-axes in ``radius_mm`` (anisotropic, randomly rotated), a centre
    inside the (eroded) brain, and multiplies intensities by ``1 + c`` with ``|c|`` in ``contrast``
    and a random sign; the edge is blended over about one voxel. Voxels outside the brain are not
    changed.

    Args:
        volume: :class:`~slice2vol.data.io.Volume` with data (C, X, Y, Z) in [0, 1].

    Returns:
        (lesioned Volume, lesion mask (X, Y, Z) bool).
    """
    from scipy.ndimage import binary_erosion, gaussian_filter

    cfg = cfg or AnomalyConfig()
    brain = brain_mask(volume)
    inner = binary_erosion(brain, iterations=3)
    candidates = np.argwhere(inner if inner.any() else brain)
    spacing = np.asarray(volume.spacing)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), -1).astype(np.float32)
    data = volume.data.copy()
    lesion = np.zeros(volume.shape, dtype=bool)
    n_lesions = int(rng.integers(cfg.n_lesions[0], cfg.n_lesions[1] + 1))
    for _ in range(n_lesions):
        centre = candidates[rng.integers(len(candidates))]
        radii = rng.uniform(*cfg.radius_mm, size=3) / spacing
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        local = (grid - centre) @ q  # rotated voxel offsets
        dist = np.sqrt(((local / radii) ** 2).sum(-1))
        soft = gaussian_filter((dist <= 1).astype(np.float32), 0.7) * brain
        change = rng.uniform(*cfg.contrast) * rng.choice([-1.0, 1.0])
        data = data * (1 + change * soft[None])
        lesion |= (soft > 0.5)
    data = np.clip(data, 0, 1).astype(np.float32)
    return dataclasses.replace(volume, data=data, maps={**volume.maps, "sim_lesion": lesion.astype(np.uint8)}), lesion


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


def cell_positions(ds, grid: tuple[int, int], rows: np.ndarray | None = None) -> np.ndarray:
    """(S, gh, gw, 3) cell centres in mm: (through-plane, in-plane row, in-plane column)."""
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
    pos = cell_positions(ds, grid)[keep]
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
            pos = cell_positions(ds, grid, rows)[near] if self.cfg.position_weight > 0 else None
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
    """Lesion-wise detection: (lesions whose highest voxel score reaches ``threshold``, lesions).

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
    return int((peaks >= threshold).sum()), n


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

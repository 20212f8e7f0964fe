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
from dataclasses import dataclass

import numpy as np

from slice2vol.eval.linear import _Standardizer


@dataclass
class AnomalyConfig:
    """Attributes:
    scorers: any of ``knn``, ``mahalanobis``, ``ocsvm``.
    knn_k: neighbours of the k-NN distance scorer.
    n_lesions: (min, max) lesions per volume.
    radius_mm: (min, max) lesion semi-axis.
    contrast: (min, max) absolute relative intensity change; the sign is drawn at random.
    plane, stride, size: slices embedded by 2D encoders (one plane keeps the cost down).
    max_subjects: use at most this many subjects, None for all.
    seed: lesion placement seed.
    """

    scorers: tuple[str, ...] = ("knn", "mahalanobis", "ocsvm")
    knn_k: int = 5
    n_lesions: tuple[int, int] = (1, 3)
    radius_mm: tuple[float, float] = (5.0, 12.0)
    contrast: tuple[float, float] = (0.3, 0.6)
    plane: str = "axial"
    stride: int = 4
    size: int = 112
    max_subjects: int | None = None
    seed: int = 0


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

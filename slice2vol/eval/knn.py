"""k-NN probe (DINO protocol) on volume embeddings, with FAISS.

Features are L2-normalised so inner product is cosine similarity; one FAISS search at the largest k
serves every k asked for. Two votes per k: temperature-weighted (weight ``exp(sim / T)``, T = 0.07 as
in DINO/DINOv2) and plain majority. Continuous targets get the weighted mean of the neighbours.

Centring: volume embeddings of ReLU networks live in one orthant, so all pairwise cosines are close
to 1 (median 0.99 on IXI MobileNetV2 means) and ``exp(sim / T)`` is nearly uniform: the weighted vote
degenerates into the majority vote, while a zero-centred encoder gets a real weighted vote. With
``center=True`` the training-fold mean is subtracted from training and query rows before the L2
normalisation, which gives every encoder the same effective protocol (the benchmark's default,
``KNNConfig.center``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class KNNConfig:
    """Attributes:
    ks: neighbour counts evaluated in one pass. In the benchmark a k larger than a label's smallest
        training fold is clipped to it in every fold and listed in the report's box of substitutions.
    temperature: softmax temperature of the weighted vote.
    center: subtract the training-fold mean before normalising (see the module docstring).
    """

    ks: tuple[int, ...] = (10, 20)
    temperature: float = 0.07
    center: bool = True

    def __post_init__(self) -> None:
        _check_ks(self.ks, self.temperature, "knn.")


def _check_ks(ks: Sequence[int], temperature: float, prefix: str = "") -> tuple[int, ...]:
    """``ks`` as ints >= 1 and a positive temperature, or one line naming the key."""
    if isinstance(ks, (int, str)) or not len(ks):
        raise ValueError(f"{prefix}ks must be a non-empty list of neighbour counts, got {ks!r}")
    try:
        values = tuple(int(k) for k in ks)
    except (TypeError, ValueError):
        raise ValueError(f"{prefix}ks must be whole numbers >= 1, got {list(ks)!r}") from None
    if min(values) < 1 or any(float(k) != int(k) for k in ks):
        raise ValueError(f"{prefix}ks must be whole numbers >= 1, got {list(ks)!r}")
    if not float(temperature) > 0:
        raise ValueError(f"{prefix}temperature must be > 0, got {temperature!r}")
    return values


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation of (N, D) -> float32 (N, D) (in float64: the squared norm of
    float32 values beyond ~1e19 overflows, which zeroed those rows)."""
    x = np.asarray(x, dtype=np.float64)
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)).astype(np.float32)


def cosine_neighbours(train_x: np.ndarray, query_x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` cosine neighbours of each query among the training rows.

    Args:
        train_x: (N, D) features.
        query_x: (M, D) features.
        k: neighbours, at most N.

    Returns:
        similarities (M, k) in decreasing order and indices (M, k) into ``train_x``.
    """
    import faiss

    train = l2_normalize(train_x)
    query = l2_normalize(query_x)
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(np.ascontiguousarray(train))
    sims, idx = index.search(np.ascontiguousarray(query), int(k))
    return sims, idx


class KNNProbe:
    """k-NN classifier/regressor reporting several k and both vote rules at once.

    Example:
        >>> probe = KNNProbe(ks=(10, 20)).fit(x_train, y_train)
        >>> out = probe.predict(x_test)   # {(k, "weighted"): proba (M, C), (k, "majority"): ...}
    """

    def __init__(self, ks: Sequence[int] = (10, 20), temperature: float = 0.07,
                 task: str = "classification", center: bool = False) -> None:
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be classification or regression, got {task!r}")
        self.ks = _check_ks(ks, temperature)
        self.temperature = float(temperature)
        self.task = task
        self.center = center

    def fit(self, x: np.ndarray, y: np.ndarray) -> "KNNProbe":
        """Stores L2-normalised (optionally centred) training features (N, D) and targets (N,)."""
        x = np.asarray(x, dtype=np.float64)
        self.mean_ = x.mean(0) if self.center else np.zeros(x.shape[1])
        self.train_x_ = l2_normalize(x - self.mean_)
        y = np.asarray(y)
        if self.task == "classification":
            self.classes_, self.train_codes_ = np.unique(y, return_inverse=True)
        else:
            self.train_y_ = y.astype(np.float64)
        return self

    def effective_ks(self) -> tuple[int, ...]:
        n = len(self.train_x_)
        return tuple(sorted({min(k, n) for k in self.ks}))

    def predict(self, x: np.ndarray) -> dict[tuple[int, str], np.ndarray]:
        """Predictions for every (k, vote) pair.

        Args:
            x: (M, D) query features.

        Returns:
            classification: ``(k, "weighted"|"majority") -> (M, C)`` class probabilities in the order
            of ``classes_``; regression: ``(k, "weighted"|"mean") -> (M,)`` predictions.
            ``k`` is the requested k (clipped to the training-set size when larger).
        """
        kmax = max(self.effective_ks())
        sims, idx = cosine_neighbours(self.train_x_, np.asarray(x, dtype=np.float64) - self.mean_, kmax)
        out: dict[tuple[int, str], np.ndarray] = {}
        for k_req in self.ks:
            k = min(k_req, len(self.train_x_))
            s, i = sims[:, :k].astype(np.float64), idx[:, :k]
            # subtracting the row max keeps exp() finite and leaves normalised weights unchanged
            w = np.exp((s - s.max(1, keepdims=True)) / self.temperature)
            if self.task == "classification":
                onehot = np.eye(len(self.classes_))[self.train_codes_[i]]  # (M, k, C)
                weighted = (w[..., None] * onehot).sum(1)
                out[(k_req, "weighted")] = weighted / weighted.sum(1, keepdims=True)
                out[(k_req, "majority")] = onehot.mean(1)
            else:
                vals = self.train_y_[i]
                out[(k_req, "weighted")] = (w * vals).sum(1) / w.sum(1)
                out[(k_req, "mean")] = vals.mean(1)
        return out

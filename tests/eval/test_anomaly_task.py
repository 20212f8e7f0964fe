"""Anomaly scorers on embeddings: a shifted population is found, an identical one scores at chance."""

from __future__ import annotations

import numpy as np
import pytest

from slice2vol.eval.anomaly import AnomalyConfig, KNNDistance, Mahalanobis, OneClassSVMScorer, build_scorer
from slice2vol.eval.metrics import _binary_auc
from slice2vol.eval.splits import SplitConfig, make_splits
from slice2vol.eval.tasks.anomaly import _score_anomaly

N = 60


def _embeddings(shift: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    healthy = rng.normal(size=(N, 16))
    sick = rng.normal(size=(N, 16))
    sick[:, :4] += shift
    pack = lambda x: [(row, None, None) for row in x]  # noqa: E731
    return pack(healthy), pack(sick)


@pytest.mark.parametrize("shift,low,high", [(2.0, 0.9, 1.01), (0.0, 0.3, 0.7)])
def test_anomaly_scorers_signal_and_chance(shift, low, high):
    healthy, sick = _embeddings(shift)
    ids = [f"s{i}" for i in range(N)]
    splits = make_splits(ids, None, cfg=SplitConfig(n_folds=4))
    out = _score_anomaly(healthy, sick, splits, ids, AnomalyConfig(knn_k=5), build_scorer, _binary_auc)
    for scorer in ("knn", "mahalanobis", "ocsvm"):
        res = out["subject"][scorer]
        truth = np.r_[np.zeros(N), np.ones(N)].astype(bool)
        auc = _binary_auc(truth, np.r_[res["healthy"], res["lesioned"]])
        assert low < auc < high, (scorer, auc)


@pytest.mark.parametrize("scale", [1.0, 1e-9])
def test_scorers_fit_on_healthy_rank_outliers(scale):
    rng = np.random.default_rng(1)
    train = rng.normal(size=(80, 8)) * scale
    test = np.r_[rng.normal(size=(20, 8)), rng.normal(size=(20, 8)) + 4] * scale
    for scorer in (KNNDistance(5), Mahalanobis(), OneClassSVMScorer()):
        s = scorer.fit(train).score(test)
        assert s.shape == (40,)
        assert _binary_auc(np.r_[np.zeros(20), np.ones(20)].astype(bool), s) > 0.95

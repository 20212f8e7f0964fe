"""Known signal -> every task well above chance; shuffled labels -> chance."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from slice2vol.eval.anomaly import AnomalyConfig, KNNDistance, Mahalanobis, OneClassSVMScorer, build_scorer
from slice2vol.eval.metrics import _binary_auc
from slice2vol.eval.runner import EmbeddingSet, ExperimentConfig, _score_anomaly, evaluate_sets
from slice2vol.eval.segmentation import DenseLinearProbe, dice_per_class
from slice2vol.eval.splits import SplitConfig, make_splits
from slice2vol.eval.knn import KNNConfig
from slice2vol.eval.linear import LinearConfig

N, D = 60, 32


def cohort(seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"sub-{i:03d}" for i in range(N)]
    dx = np.array(["CN", "AD"])[np.arange(N) % 2]
    age = rng.uniform(20, 80, N)
    signal = rng.normal(size=(N, D))
    signal[:, :4] += 2.0 * (dx == "AD")[:, None]  # class signal
    signal[:, 4:8] += ((age - 50) / 10)[:, None]  # age signal
    noise = rng.normal(size=(N, D))
    labels = pd.DataFrame({"dx": dx, "age": age}, index=pd.Index(ids, name="subject_id"))
    sets = {"signal": EmbeddingSet("signal", ids, signal.astype(np.float32)),
            "noise": EmbeddingSet("noise", ids[::-1], noise[::-1].astype(np.float32))}  # other row order
    return sets, labels


def config():
    return ExperimentConfig(tasks=["knn", "linear"], splits=SplitConfig(n_folds=5, n_repeats=1),
                            knn=KNNConfig(ks=(5, 10)), primary_k=10,
                            linear=LinearConfig(Cs=(0.01, 0.1, 1.0), alphas=(1.0, 10.0, 100.0)),
                            n_bootstrap=50, n_permutations=50, reference="noise")


def pick(rows, encoder, label, task, metric):
    return [r for r in rows if r["encoder"] == encoder and r["label"] == label and r["task"] == task
            and r["metric"] == metric]


def test_probes_find_signal_and_paired_test(tmp_path):
    sets, labels = cohort()
    ev = evaluate_sets(sets, labels, {"dx": "categorical", "age": "continuous"}, config(), tmp_path, None, False)
    for task in ("knn", "linear"):
        for r in pick(ev["rows"], "signal", "dx", task, "roc_auc"):
            assert r["point"] > 0.9, r
        for r in pick(ev["rows"], "noise", "dx", task, "roc_auc"):
            assert 0.25 < r["point"] < 0.75, r
        for r in pick(ev["rows"], "signal", "age", task, "pearson_r"):
            assert r["point"] > 0.7, r
        for r in pick(ev["rows"], "noise", "age", task, "pearson_r"):
            assert abs(r["point"]) < 0.35, r
    # the same saved splits serve both encoders; paired tests favour the signal
    assert (tmp_path / "dx.json").exists() and (tmp_path / "age.json").exists()
    auc_tests = [p for p in ev["paired"] if p["label"] == "dx"]
    assert {p["variant"] for p in auc_tests} == {"k=10 weighted", "logistic"}
    for p in auc_tests:
        assert p["encoder"] == "signal" and p["reference"] == "noise"
        assert p["delta"] > 0.2 and p["p_value"] < 0.05
    mae_tests = [p for p in ev["paired"] if p["label"] == "age"]
    assert all(p["delta"] < 0 and p["metric"] == "mae" for p in mae_tests)


def test_shuffled_labels_score_at_chance(tmp_path):
    sets, labels = cohort()
    rng = np.random.default_rng(5)
    shuffled = labels.copy()
    shuffled["dx"] = rng.permutation(labels["dx"].to_numpy())
    shuffled["age"] = rng.permutation(labels["age"].to_numpy())
    ev = evaluate_sets({"signal": sets["signal"]}, shuffled, {"dx": "categorical", "age": "continuous"}, config(),
                       tmp_path, None, False)
    for task in ("knn", "linear"):
        for r in pick(ev["rows"], "signal", "dx", task, "roc_auc"):
            assert 0.25 < r["point"] < 0.75, r
            assert r["ci_low"] < 0.5 < r["ci_high"] or abs(r["point"] - 0.5) < 0.15
        for r in pick(ev["rows"], "signal", "age", task, "r2"):
            assert r["point"] < 0.1, r


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


def _token_data(n_slices, rng, shuffle=False):
    """4x4 token grid over 16x16 label maps: each token's features encode its class."""
    k, d = 3, 12
    coarse = rng.integers(0, k + 1, (n_slices, 4, 4))
    labels = torch.as_tensor(np.kron(coarse, np.ones((4, 4), dtype=int)))
    feats = np.eye(k + 1)[coarse] @ rng.normal(size=(k + 1, d)) * 2 + rng.normal(size=(n_slices, 4, 4, d)) * 0.5
    tokens = torch.as_tensor(feats.reshape(n_slices, 16, d), dtype=torch.float32)
    if shuffle:
        labels = labels[torch.as_tensor(rng.permutation(n_slices))]
    return tokens, labels


@pytest.mark.parametrize("shuffle", [False, True])
def test_dense_probe_signal_and_chance(shuffle):
    rng = np.random.default_rng(0)
    tokens, labels = _token_data(120, rng, shuffle)
    probe = DenseLinearProbe(3, epochs=30, lr=0.05, seed=0).fit(tokens[:80], (4, 4), labels[:80])
    assert probe.losses_[-1] < probe.losses_[0]
    pred = probe.predict_proba(tokens[80:], (4, 4), (16, 16)).argmax(1).numpy()
    assert pred.shape == (40, 16, 16)
    dice = dice_per_class(pred, labels[80:].numpy(), 3)
    if shuffle:
        assert np.nanmean(dice) < 0.4  # four equiprobable classes: chance Dice ~0.25
    else:
        assert np.nanmean(dice) > 0.85


def test_dense_probe_tiny_scale_tokens():
    rng = np.random.default_rng(1)
    tokens, labels = _token_data(60, rng)
    probe = DenseLinearProbe(3, epochs=15, lr=0.05, seed=0).fit(tokens[:40] * 1e-9, (4, 4), labels[:40])
    pred = probe.predict_proba(tokens[40:] * 1e-9, (4, 4), (16, 16)).argmax(1).numpy()
    assert np.nanmean(dice_per_class(pred, labels[40:].numpy(), 3)) > 0.8

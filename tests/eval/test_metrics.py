"""Metrics equal scikit-learn; bootstrap intervals and paired tests behave."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn import metrics as skm

from slice2vol.eval.metrics import (bootstrap_ci, classification_metrics, mean_sd, metric_fn, paired_test,
                                    regression_metrics)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_classification_metrics_match_sklearn(n_classes):
    rng = np.random.default_rng(n_classes)
    classes = np.array(["a", "b", "c"][:n_classes])
    y = classes[rng.integers(0, n_classes, 60)]
    proba = rng.dirichlet(np.ones(n_classes), 60)
    proba[np.arange(60), np.searchsorted(classes, y)] += 0.3  # some signal
    proba /= proba.sum(1, keepdims=True)
    ours = classification_metrics(y, proba, classes)
    pred = classes[proba.argmax(1)]
    assert ours["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert ours["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert ours["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    auc = (skm.roc_auc_score(y == classes[1], proba[:, 1]) if n_classes == 2
           else skm.roc_auc_score(y, proba, multi_class="ovr", labels=classes))
    assert ours["roc_auc"] == pytest.approx(auc)


def test_auc_with_ties_and_one_class():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.5, 0.5]] * 4)
    assert classification_metrics(y, p, [0, 1])["roc_auc"] == pytest.approx(0.5)
    assert np.isnan(classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.4, 0.6]]), [0, 1])["roc_auc"])


def test_regression_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.normal(50, 10, 40)
    p = y + rng.normal(0, 5, 40)
    ours = regression_metrics(y, p)
    assert ours["mae"] == pytest.approx(skm.mean_absolute_error(y, p))
    assert ours["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(y, p)))
    assert ours["r2"] == pytest.approx(skm.r2_score(y, p))
    assert ours["pearson_r"] == pytest.approx(pearsonr(y, p)[0])


def test_pearson_r_of_a_prediction_constant_up_to_rounding_is_nan_in_both_forms():
    from slice2vol.eval.weighted import regression

    rng = np.random.default_rng(0)
    y = rng.normal(50, 10, 30)
    # the mean for everyone, differing only in the last bits (what a collapsed ridge returns)
    flat = np.full(30, 47.3) * (1 + rng.integers(-2, 3, 30) * np.finfo(float).eps)
    assert np.ptp(flat) > 0 and abs(np.corrcoef(y, flat)[0, 1]) > 0.05  # numpy reports noise as signal
    assert np.isnan(regression_metrics(y, flat)["pearson_r"])
    assert np.isnan(regression("pearson_r", y, flat, np.ones((1, 30)))[0])
    assert np.isnan(regression_metrics(np.full(30, 7.0), y)["r2"])
    # a small but real spread is kept, and agrees with scipy
    small = 47.3 + 1e-6 * (y - 50)
    assert regression_metrics(y, small)["pearson_r"] == pytest.approx(pearsonr(y, small)[0])
    assert regression("pearson_r", y, small, np.ones((1, 30)))[0] == pytest.approx(pearsonr(y, small)[0])


def test_mean_sd():
    assert mean_sd([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_sd([4.0, float("nan")]) == (4.0, 0.0)


def test_bootstrap_ci_contains_point_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    fn = metric_fn("mae", "continuous")
    widths = []
    for n in (30, 300):
        y = rng.normal(size=n)
        preds = (y + rng.normal(size=n))[None]
        point, lo, hi = bootstrap_ci(y, preds, fn, n_boot=300, seed=0)
        assert lo <= point <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2
    # a perfect classifier has a degenerate interval at 1
    y = np.array([0, 1] * 10)
    perfect = np.eye(2)[y][None]
    assert bootstrap_ci(y, perfect, metric_fn("accuracy", "categorical", [0, 1]), n_boot=100) == (1.0, 1.0, 1.0)


def test_paired_test_identical_encoders_p_one():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 40)
    preds = rng.dirichlet([1, 1], (2, 40))
    res = paired_test(y, preds, preds.copy(), metric_fn("roc_auc", "categorical", [0, 1]), n_boot=200, n_perm=200)
    assert res["delta"] == 0 and res["p_value"] == pytest.approx(1.0)
    assert res["ci_low"] == res["ci_high"] == 0


def test_paired_test_detects_a_better_encoder():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    good = np.clip(np.eye(2)[y] * 0.6 + rng.random((60, 2)) * 0.4, 1e-3, None)[None]
    noise = rng.dirichlet([1, 1], (1, 60))
    res = paired_test(y, good, noise, metric_fn("roc_auc", "categorical", [0, 1]), n_boot=300, n_perm=300)
    assert res["delta"] > 0.3 and res["ci_low"] > 0 and res["p_value"] < 0.01
    # symmetric: B vs A gives the negative difference and the same p-value
    rev = paired_test(y, noise, good, metric_fn("roc_auc", "categorical", [0, 1]), n_boot=300, n_perm=300)
    assert rev["delta"] == pytest.approx(-res["delta"]) and rev["p_value"] < 0.01
    # regression: lower-is-better metric, delta < 0 when A is better
    yc = rng.normal(size=50)
    res = paired_test(yc, (yc + 0.1 * rng.normal(size=50))[None], rng.normal(size=(1, 50)),
                      metric_fn("mae", "continuous"), n_boot=200, n_perm=200)
    assert res["delta"] < 0 and res["p_value"] < 0.01
    with pytest.raises(ValueError, match="shape"):
        paired_test(yc, np.zeros((1, 50)), np.zeros((2, 50)), metric_fn("mae", "continuous"))


def test_holm_hand_computed_and_monotone():
    from slice2vol.eval.metrics import holm

    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1 -> max(0.06, 0.04)=0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    out = holm([0.2, float("nan"), 0.01])
    assert np.isnan(out[1]) and out[0] == pytest.approx(0.2) and out[2] == pytest.approx(0.02)  # m = 2 finite
    rng = np.random.default_rng(0)
    p = rng.random(12)
    adj = np.asarray(holm(p))
    assert np.all(adj >= p) and np.all(np.diff(adj[np.argsort(p)]) >= -1e-12)


def test_fold_mean_auc_is_not_dragged_down_by_fold_offsets():
    """Each fold ranks its own subjects perfectly but on its own scale: pooled AUC < 1, fold mean = 1."""
    from slice2vol.eval.estimates import headline_kind
    from slice2vol.eval.metrics import fold_index

    y = np.array([0, 1] * 10)
    fold = np.repeat(np.arange(5), 4)
    score = 0.1 * y + 0.3 * fold  # later folds: everything shifted up
    proba = np.stack([1 - score, score], -1)[None] / 1.6
    fold_of = fold_index(20, [(0, np.flatnonzero(fold == k)) for k in range(5)])
    fn = metric_fn("roc_auc", "categorical", [0, 1])
    pooled, _, _ = bootstrap_ci(y, proba, fn, n_boot=50)
    fold_mean, lo, hi = bootstrap_ci(y, proba, fn, n_boot=50, fold_of=fold_of)
    assert pooled < 0.8 and fold_mean == 1.0 and lo == hi == 1.0
    assert headline_kind("roc_auc") == "fold_mean" and headline_kind("mae") == "pooled"
    assert headline_kind("roc_auc", "pooled") == "pooled"
    # paired test on the fold-mean estimator: the same encoder twice gives p = 1, delta 0
    res = paired_test(y, proba, proba.copy(), fn, n_boot=50, n_perm=50, fold_of=fold_of)
    assert res["delta"] == 0 and res["p_value"] == pytest.approx(1.0)


def test_numpy_auc_equals_sklearn_with_many_ties():
    from slice2vol.eval.metrics import _binary_auc

    rng = np.random.default_rng(4)
    for _ in range(20):
        y = rng.random(30) < 0.4
        s = np.round(rng.random(30), 1)  # heavy ties
        if y.any() and not y.all():
            assert _binary_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s))


def test_paired_test_without_data_or_with_an_undefined_metric_is_no_test():
    """No subject both sets scored (or a metric that is NaN for one set) gives p = NaN, not
    1/(P+1) -- the smallest p the permutation test can give -- which a report read as significant."""
    from slice2vol.eval.metrics import paired_test

    mean = lambda y, p: float(np.mean(p))  # noqa: E731
    empty = paired_test(np.zeros(0), np.zeros((1, 0)), np.zeros((1, 0)), mean, n_boot=20, n_perm=20)
    assert all(np.isnan(empty[k]) for k in ("delta", "ci_low", "ci_high", "p_value"))
    a = np.array([[np.nan, 1.0, 2.0]])
    undefined = paired_test(np.zeros(3), a, np.ones((1, 3)), mean, n_boot=20, n_perm=20)
    assert np.isnan(undefined["p_value"]) and np.isnan(undefined["ci_low"])
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        paired_test(np.zeros(3), np.ones((1, 3)), np.ones((1, 3)), mean, level=95)


def test_bootstrap_interval_is_the_2_5_and_97_5_percentile_of_hand_drawn_resamples():
    """Same seed, same draws (one ``rng.integers(0, n, n)`` per resample, in order), metric by numpy on
    the drawn subjects, interval by np.quantile at 2.5 % and 97.5 %: a 90 % interval passed before."""
    rng = np.random.default_rng(11)
    y = rng.normal(size=50)
    preds = (y + rng.normal(0, 0.5, 50) * rng.uniform(0.2, 3, 50))[None]  # heavy-tailed errors
    point, lo, hi = bootstrap_ci(y, preds, metric_fn("mae", "continuous"), n_boot=400, seed=7)
    draws = np.random.default_rng(7)
    stats = []
    for _ in range(400):
        idx = draws.integers(0, 50, 50)
        stats.append(np.mean(np.abs(preds[0][idx] - y[idx])))
    assert point == pytest.approx(np.mean(np.abs(preds[0] - y)))
    assert (lo, hi) == pytest.approx(tuple(np.quantile(stats, [0.025, 0.975])), rel=1e-9)
    # and the level is honoured: 80 % -> 10 % and 90 %
    _, lo80, hi80 = bootstrap_ci(y, preds, metric_fn("mae", "continuous"), n_boot=400, seed=7, level=0.8)
    assert (lo80, hi80) == pytest.approx(tuple(np.quantile(stats, [0.1, 0.9])), rel=1e-9)


@pytest.mark.parametrize("batched", [True, False])
def test_permutation_p_value_counts_the_observed_split(batched):
    """p = (1 + #permutations at least as extreme) / (1 + P): identical encoders give 1; a perfect
    encoder against one that is always wrong on 40 subjects (only the all-or-nothing swaps, chance
    2 / 2**40, are as extreme) gives exactly 1 / (1 + P), never 0."""
    y = np.array([0, 1] * 20)
    perfect = np.eye(2)[y][None]
    wrong = np.eye(2)[1 - y][None]
    fn = metric_fn("accuracy", "categorical", [0, 1])
    if not batched:  # any callable: the one-call-per-draw loop
        fn = lambda yy, p: float(np.mean(np.argmax(p, 1) == yy))  # noqa: E731
    res = paired_test(y, perfect, wrong, fn, n_boot=20, n_perm=99, seed=0)
    assert res["delta"] == 1.0 and res["p_value"] == pytest.approx(1 / 100)
    same = paired_test(y, perfect, perfect.copy(), fn, n_boot=20, n_perm=99, seed=0)
    assert same["p_value"] == 1.0

"""Cross-validation helper: folds, metrics vs scikit-learn, no leakage across folds."""

import numpy as np
import pytest
from sklearn import metrics

from slice2vol.aggregate import build_aggregator, cross_validate_aggregator
from slice2vol.aggregate.evaluate import fold_metrics, subject_folds


def test_subject_folds_partition_and_stratify():
    y = np.array([0] * 10 + [1] * 20)
    folds = subject_folds(y, "classification", 5, seed=0)
    test = np.concatenate([te for _, te in folds])
    assert sorted(test) == list(range(30))
    for train, te in folds:
        assert not set(train) & set(te) and y[te].sum() == 4  # 1:2 ratio kept
    age = np.linspace(20, 80, 25)
    for _, te in subject_folds(age, "regression", 5, seed=1):
        # one subject from each age quintile per fold
        assert sorted(np.searchsorted(np.quantile(age, [0.2, 0.4, 0.6, 0.8]), age[te], side="right")) == [0, 1, 2, 3, 4]


def test_fold_metrics_match_sklearn():
    y = np.array(["F", "M", "M", "F", "M"])
    proba = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9], [0.2, 0.8]])
    out = fold_metrics("classification", y, proba, np.array(["F", "M"]))
    assert out["auc"] == pytest.approx(metrics.roc_auc_score(y == "M", proba[:, 1]))
    assert out["accuracy"] == pytest.approx(0.6)
    t, p = np.array([30.0, 40, 50, 60]), np.array([32.0, 41, 47, 66])
    out = fold_metrics("regression", t, p, np.array([]))
    assert out["mae"] == pytest.approx(3.0) and out["r"] == pytest.approx(np.corrcoef(t, p)[0, 1])


def test_cross_validation_of_mean_pooling_on_a_linear_signal():
    rng = np.random.default_rng(0)
    n = 40
    age = rng.uniform(20, 80, n)
    bags = [{"axial": rng.normal(0, 1, (6, 5)) + np.array([a / 10, 0, 0, 0, 0])} for a in age]
    res = cross_validate_aggregator(bags, age, "mean", task="regression", folds=4, seed=0)
    assert len(res.folds) == 4 and res.predictor == "probe"
    mae, sd = res.summary()["mae"]
    assert mae < 5.0 and sd >= 0 and np.isfinite(res.predictions).all()
    assert "mae" in res.format() and "±" in res.format()


def test_trainable_aggregator_is_refitted_per_fold_on_its_training_subjects(monkeypatch):
    bags = [{"axial": np.full((3, 2), float(i))} for i in range(20)]
    y = np.arange(20) % 2
    fitted = []
    mil_cls = type(build_aggregator("mil"))
    original = mil_cls.fit

    def spy(self, fit_bags, fit_y=None):
        fitted.append(sorted(int(b["axial"][0, 0]) for b in fit_bags))
        return original(self, fit_bags, fit_y)

    monkeypatch.setattr(mil_cls, "fit", spy)
    res = cross_validate_aggregator(bags, y, "mil", folds=4, seed=0, hidden=4, epochs=1)
    assert len(fitted) == 4
    folds = subject_folds(y, "classification", 4, 0)
    for ids, (train, test) in zip(fitted, folds):
        assert ids == sorted(train) and not set(ids) & set(test)
    assert res.predictor == "head"


def test_cross_validation_errors():
    bags = [{"axial": np.ones((3, 2))}] * 4
    with pytest.raises(ValueError, match="4 bags but 3 labels"):
        cross_validate_aggregator(bags, [0, 1, 0], "mean")
    with pytest.raises(ValueError, match="missing"):
        cross_validate_aggregator(bags, [1.0, np.nan, 2.0, 3.0], "mean", task="regression", folds=2)
    with pytest.raises(ValueError, match="task must be"):
        cross_validate_aggregator(bags, [0, 1, 0, 1], "mean", task="survival")
    with pytest.raises(ValueError, match="predictor='head'"):
        cross_validate_aggregator(bags, [0, 1, 0, 1], "mean", folds=2, predictor="head")


# regression used K quantile bins of N/K subjects: StratifiedKFold refused any N < K^2
@pytest.mark.parametrize("n, folds", [(6, 3), (8, 4), (12, 4), (20, 5), (10, 5), (48, 10), (25, 5)])
def test_regression_folds_work_whenever_there_are_two_subjects_per_fold(n, folds):
    age = np.random.default_rng(n).uniform(20, 80, n)
    parts = subject_folds(age, "regression", folds, seed=0)
    assert len(parts) == folds
    assert sorted(np.concatenate([te for _, te in parts])) == list(range(n))
    order = np.argsort(age)
    for _, te in parts:  # still stratified: each fold holds a young and an old subject
        assert len(te) in (n // folds, -(-n // folds))
        ranks = np.searchsorted(age[order], age[te])
        assert ranks.min() < n // 2 <= ranks.max()


# the probe's inner 3-fold grid search needed 3 per class in every training fold
@pytest.mark.parametrize("per_class, folds", [(2, 2), (3, 2), (3, 3), (4, 4), (5, 2)])
def test_classification_cv_works_with_as_few_subjects_per_class_as_folds(per_class, folds):
    rng = np.random.default_rng(per_class)
    y = np.repeat(["A", "B"], per_class)
    bags = [{"axial": rng.normal(0, 1, (4, 3)) + (label == "B") * 2.0} for label in y]
    res = cross_validate_aggregator(bags, y, "mean", folds=folds, seed=0)
    assert len(res.folds) == folds and np.isfinite(res.predictions).all() and res.predictor == "probe"


def _probe_reference(x_train, y_train, x_test, seed):
    """The documented probe by hand: standardise on the training fold, choose C on its 3 stratified inner
    folds by the mean held-out log-loss (scikit-learn's ``log_loss``; first C of the grid on a tie), refit."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    xs = scaler.transform(x_train)
    inner = list(StratifiedKFold(3, shuffle=True, random_state=seed).split(xs, y_train))
    grid = np.logspace(-4, 2, 7)
    loss = [np.mean([metrics.log_loss(y_train[va], LogisticRegression(C=c, max_iter=5000).fit(xs[tr], y_train[tr])
                                      .predict_proba(xs[va]), labels=[0, 1]) for tr, va in inner]) for c in grid]
    best = grid[int(np.argmin(loss))]
    return LogisticRegression(C=best, max_iter=5000).fit(xs, y_train).predict_proba(scaler.transform(x_test))[:, 1]


def test_probe_chooses_c_by_inner_log_loss_like_scikit_learn_by_hand():
    """Out-of-fold probabilities of a parameter-free aggregator equal a hand-written probe whose C minimises
    the inner log-loss (accuracy, with its ties, picks other Cs here)."""
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(3)
    n = 36
    y = np.arange(n) % 2
    bags = [{"axial": rng.normal(0, 1, (5, 4)) + np.array([0.6 * label, 0, 0, 0])} for label in y]
    pooled = np.stack([b["axial"].mean(0) for b in bags])
    np.testing.assert_allclose(build_aggregator("mean").fit(bags).transform(bags), pooled, rtol=1e-6)
    res = cross_validate_aggregator(bags, y, "mean", folds=3, seed=0)
    assert res.predictor == "probe"
    expected = np.full(n, np.nan)
    outer = StratifiedKFold(3, shuffle=True, random_state=0).split(np.zeros(n), y)  # scikit-learn's, not subject_folds
    for train, test in outer:
        expected[test] = _probe_reference(pooled[train], y[train], pooled[test], seed=0)
    np.testing.assert_allclose(res.predictions, expected, atol=1e-5)


def test_summary_is_the_fold_mean_and_sample_sd():
    from slice2vol.aggregate.evaluate import CVResult

    res = CVResult("mean", {}, "classification", "probe", folds=[{"auc": 0.6}, {"auc": 0.8}, {"auc": 0.7}])
    # deviations -0.1, 0.1, 0: sum of squares 0.02 over n - 1 = 2 -> sd 0.1 (not sqrt(0.02 / 3) = 0.0816)
    assert res.summary()["auc"] == pytest.approx((0.7, 0.1))
    assert CVResult("mean", {}, "classification", "probe", folds=[{"auc": 0.6}]).summary()["auc"] == (0.6, 0.0)

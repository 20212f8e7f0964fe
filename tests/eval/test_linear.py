"""Linear probe: penalty sweep on training data only, standardisation inside the fold, sklearn refit."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from slice2vol.eval.cohort import LabelSplits
from slice2vol.eval.experiment import ExperimentConfig
from slice2vol.eval.linear import LinearConfig, LinearProbe
from slice2vol.eval.sets import EmbeddingSet
from slice2vol.eval.splits import SplitConfig, make_splits
from slice2vol.eval.tasks import linear as linear_task
from slice2vol.eval.tasks.base import TaskContext


def data(n=60, d=20, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 20, d)  # very different feature scales
    y = (x[:, 0] / x[:, 0].std() + 0.5 * rng.normal(size=n) > 0).astype(int)
    return x, y


def test_refit_equals_sklearn_pipeline_with_chosen_c():
    x, y = data()
    probe = LinearProbe("classification", LinearConfig(Cs=(0.001, 0.1, 10.0))).fit(x[:40], y[:40])
    assert set(probe.sweep_) == {0.001, 0.1, 10.0}
    # the C scikit-learn's own cross-validation picks (same inner folds, neg_log_loss), not the probe's
    reference = _sklearn_sweep("classification", x[:40], y[:40], (0.001, 0.1, 10.0))
    c_best = max(reference, key=reference.get)
    assert probe.best_param_ == c_best
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=c_best, max_iter=2000)).fit(x[:40], y[:40])
    np.testing.assert_allclose(probe.predict_proba(x[40:]), ref.predict_proba(x[40:]), atol=1e-4)
    # standardisation statistics are the training fold's own
    np.testing.assert_allclose(probe.scaler_.mean_, x[:40].mean(0))


def test_ridge_probe():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 10))
    y = x @ rng.normal(size=10) + 0.1 * rng.normal(size=80)
    probe = LinearProbe("regression").fit(x[:60], y[:60])
    ref = make_pipeline(StandardScaler(), Ridge(alpha=probe.best_param_)).fit(x[:60], y[:60])
    np.testing.assert_allclose(probe.predict(x[60:]), ref.predict(x[60:]), rtol=1e-6)
    assert probe.best_param_ <= 10  # weak penalty wins on a noiseless linear target
    assert np.corrcoef(probe.predict(x[60:]), y[60:])[0, 1] > 0.95


def test_c_sweep_uses_only_training_rows(monkeypatch, tmp_path):
    """Through the linear task: every fit of the sweep sees the training rows of its fold only."""
    x, y = data(n=40)
    x[:, -1] = np.arange(40)  # row id in the last column survives as a marker (before scaling)
    seen: list[tuple[set, set]] = []

    class Spy(LinearProbe):
        def fit(self, xs, ys, groups=None):
            seen.append(set(np.asarray(xs)[:, -1].astype(int)))
            return super().fit(xs, ys, groups=groups)

    monkeypatch.setattr(linear_task, "LinearProbe", Spy)
    ids = [f"s{i}" for i in range(40)]
    splits = make_splits(ids, y, "categorical", cfg=SplitConfig(n_folds=4, n_repeats=2))
    cfg = ExperimentConfig(tasks=["linear"], linear=LinearConfig(Cs=(0.01, 1.0)))
    frame = LabelSplits("y", "categorical", ids, y.astype(str), np.array(["0", "1"]), splits, tmp_path / "y.json")
    ctx = TaskContext(cfg=cfg, base=tmp_path, out=tmp_path)
    linear_task.TASK.evaluate_set(ctx, EmbeddingSet("x", ids, x), frame)
    assert len(seen) == 8
    for rows, fold in zip(seen, splits.folds):
        train = {int(s[1:]) for s in fold.train}
        assert rows == train and not rows & {int(s[1:]) for s in fold.test}


def test_held_out_rows_cannot_change_the_fold(tmp_path):
    """Garbage in the test rows of a fold leaves that fold's fitted probe (sweep, penalty, scaler,
    predictions of other rows) unchanged: the task hands the probe training rows only."""
    x, y = data(n=48)
    ids = [f"s{i}" for i in range(48)]
    splits = make_splits(ids, y, "categorical", cfg=SplitConfig(n_folds=4))
    fold = splits.folds[0]
    tr, te = splits.positions(ids, fold)
    cfg = ExperimentConfig(tasks=["linear"], linear=LinearConfig(Cs=(0.01, 0.1, 1.0, 10.0)))
    frame = LabelSplits("y", "categorical", ids, y.astype(str), np.array(["0", "1"]), splits, tmp_path / "y.json")
    ctx = TaskContext(cfg=cfg, base=tmp_path, out=tmp_path)
    fitted = []

    class Spy(LinearProbe):
        def fit(self, xs, ys, groups=None):
            fitted.append(self)
            return super().fit(xs, ys, groups=groups)

    linear_task.LinearProbe, original = Spy, linear_task.LinearProbe
    try:
        x2 = x.copy()
        x2[te] = 1e6  # garbage in this fold's test rows only
        runs = []
        for feats in (x, x2):
            xs_tr, xs_te = EmbeddingSet("x", ids, feats).fold_features(frame, fold)
            linear_task.TASK.fit_predict(ctx, xs_tr, y[tr].astype(str), xs_te, frame, fold)
            runs.append(fitted[-1])
    finally:
        linear_task.LinearProbe = original
    a, b = runs
    assert a.sweep_ == b.sweep_ and a.best_param_ == b.best_param_
    np.testing.assert_array_equal(a.scaler_.mean_, b.scaler_.mean_)
    # and the probe does see its training rows: changing one of them changes the fit
    x3 = x.copy()
    x3[tr[0]] += 50.0
    xs_tr, xs_te = EmbeddingSet("x", ids, x3).fold_features(frame, fold)
    c = LinearProbe("classification", cfg.linear).fit(xs_tr, y[tr].astype(str))
    assert not np.array_equal(c.scaler_.mean_, a.scaler_.mean_)


def test_bad_task():
    with pytest.raises(ValueError, match="classification or regression"):
        LinearProbe("clustering")


def test_tiny_scale_features_are_standardised_not_dropped():
    """Random-init BatchNorm nets give features of order 1e-8; they still carry signal."""
    x, y = data()
    probe = LinearProbe("classification", LinearConfig(Cs=(0.1, 1.0))).fit(x[:40] * 1e-9, y[:40])
    ref = LinearProbe("classification", LinearConfig(Cs=(0.1, 1.0))).fit(x[:40], y[:40])
    np.testing.assert_allclose(probe.predict_proba(x[40:] * 1e-9), ref.predict_proba(x[40:]), atol=1e-6)


def test_a_class_with_one_training_subject_is_still_fitted():
    # 6 subjects, 3 per class, 2 outer folds: a training fold of 3 holds one subject of a class, so an
    # inner training part can be one class (sklearn: "needs samples of at least 2 classes"; it ended
    # the whole benchmark)
    x, y = data(n=3)
    y = np.array([0, 0, 1])
    probe = LinearProbe("classification", LinearConfig(Cs=(0.01, 1.0, 100.0), inner_folds=2)).fit(x, y)
    # tuned on the inner split whose training part holds both classes only
    assert set(probe.sweep_) == {0.01, 1.0, 100.0} and probe.best_param_ in probe.sweep_
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=probe.best_param_,
                                                                   max_iter=LinearConfig().max_iter)).fit(x, y)
    np.testing.assert_allclose(probe.predict_proba(x), reference.predict_proba(x), atol=1e-6)


def test_a_training_fold_of_one_class_predicts_that_class():
    x, _ = data(n=5)
    probe = LinearProbe("classification").fit(x, np.array(["M"] * 5))
    assert list(probe.classes_) == ["M"]
    np.testing.assert_array_equal(probe.predict_proba(x[:2]), np.ones((2, 1)))
    assert list(probe.predict(x[:2])) == ["M", "M"]


def test_no_inner_split_to_tune_on_takes_the_middle_of_the_grid():
    x, _ = data(n=2)
    probe = LinearProbe("classification", LinearConfig(Cs=(100.0, 0.01, 1.0))).fit(x, np.array([0, 1]))
    assert probe.sweep_ == {} and probe.best_param_ == 1.0  # every inner training part is one subject


@pytest.mark.parametrize("kwargs, message", [
    ({"Cs": ()}, r"linear.Cs must hold at least one value, each finite and > 0, got \[\]"),
    ({"alphas": ()}, r"linear.alphas must hold at least one value, each finite and > 0, got \[\]"),
    ({"Cs": (0.0,)}, r"linear.Cs must .* got \[0.0\]"),
    ({"Cs": (1.0, -1.0)}, r"linear.Cs must .* got \[1.0, -1.0\]"),
    ({"Cs": (float("nan"),)}, r"linear.Cs must .* got \[nan\]"),
    ({"Cs": (float("inf"),)}, r"linear.Cs must .* got \[inf\]"),
    ({"alphas": (-5.0,)}, r"linear.alphas must .* got \[-5.0\]"),
    ({"inner_folds": 1}, r"linear.inner_folds must be a whole number >= 2, got 1"),
    ({"inner_folds": 0}, r"linear.inner_folds must be a whole number >= 2, got 0"),
    ({"inner_folds": -3}, r"linear.inner_folds must be a whole number >= 2, got -3"),
    ({"max_iter": 0}, r"linear.max_iter must be a whole number >= 1, got 0"),
    ({"max_iter": True}, r"linear.max_iter must be a whole number >= 1, got True"),
])
def test_a_config_the_probe_cannot_honour_is_refused_when_built(kwargs, message):
    """An empty grid was an IndexError in fit(), C <= 0 scikit-learn's text, after the whole caching stage;
    inner_folds < 2 was silently run as 2 and max_iter=0 fitted nothing (fuzz round 8, H8/H9)."""
    with pytest.raises(ValueError, match=f"^{message}$"):
        LinearConfig(**kwargs)


def test_the_smallest_valid_linear_config_is_accepted():
    cfg = LinearConfig(Cs=(1e-3,), alphas=(1,), inner_folds=2, max_iter=1)
    assert cfg.Cs == (1e-3,) and cfg.inner_folds == 2


# -- the penalty sweep against scikit-learn's own cross-validation --------------------------------
def _sklearn_sweep(task, x, y, grid, seed=0, folds=3):
    """Mean inner-validation score of every penalty by scikit-learn alone: the probe's documented inner
    split (stratified / plain shuffled K-fold, ``random_state=seed``, 3 folds by default) and scorer
    (mean log-likelihood = ``neg_log_loss``; negated MSE)."""
    from sklearn.model_selection import KFold, StratifiedKFold, cross_val_score

    if task == "classification":
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
        make, scoring = (lambda c: LogisticRegression(C=c, max_iter=LinearConfig().max_iter)), "neg_log_loss"
    else:
        cv = KFold(folds, shuffle=True, random_state=seed)
        make, scoring = (lambda a: Ridge(alpha=a)), "neg_mean_squared_error"
    return {p: float(cross_val_score(make_pipeline(StandardScaler(), make(p)), x, y, cv=cv, scoring=scoring).mean())
            for p in grid}


def _ridge_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 10))
    return x, x @ rng.normal(size=10) + 0.1 * rng.normal(size=80)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_sweep_scores_and_choice_equal_scikit_learn_cross_validation(task):
    """Every sweep score is the mean validation score of a StandardScaler + model pipeline on the inner
    folds (scaler fitted on the inner-training rows only, scored on the validation rows, 3 folds by
    default), and the chosen penalty is the sweep's best: the worst one was taken unnoticed before."""
    if task == "classification":
        x, y = data()
        x, y = x[:40], y[:40]
        cfg = LinearConfig(Cs=(0.001, 0.01, 0.1, 1.0, 10.0))
        grid = cfg.Cs
    else:
        x, y = _ridge_data()
        x, y = x[:60], y[:60]
        cfg = LinearConfig()
        grid = cfg.alphas
    assert cfg.inner_folds == 3  # the default, not passed: the reference spells its own 3 folds
    probe = LinearProbe(task, cfg).fit(x, y)
    reference = _sklearn_sweep(task, x, y, grid)
    assert set(probe.sweep_) == set(reference)
    np.testing.assert_allclose([probe.sweep_[p] for p in grid], [reference[p] for p in grid], rtol=1e-7)
    best = max(grid, key=lambda p: reference[p])
    assert probe.best_param_ == best
    # a clear winner: the choice is not decided by float noise
    second = sorted(reference.values())[-2]
    assert reference[best] - second > 1e-5


@pytest.mark.parametrize("task, grid, expected", [
    ("classification", (1.0, 0.01, 100.0), 0.01),     # a tie goes to the strongest penalty: smallest C
    ("regression", (1.0, 100.0, 0.01), 100.0),        # ... largest alpha
])
def test_a_tie_in_the_sweep_goes_to_the_strongest_penalty(task, grid, expected):
    """Constant features: every penalty fits the intercept alone, so all sweep scores are equal."""
    rng = np.random.default_rng(0)
    x = np.zeros((24, 3))
    y = np.tile([0, 1], 12) if task == "classification" else rng.normal(size=24)
    cfg = LinearConfig(Cs=grid) if task == "classification" else LinearConfig(alphas=grid)
    probe = LinearProbe(task, cfg).fit(x, y)
    assert len(probe.sweep_) == 3 and len(set(probe.sweep_.values())) == 1
    assert probe.best_param_ == expected


# -- tiny training folds and grouped inner folds (fuzz: 16 IXI subjects, splits.group=site) ----------
@pytest.mark.parametrize("task, y", [
    ("regression", np.array([42.0])),               # sklearn: "n_splits=2 greater than ... n_samples=1"
    ("classification", np.array(["F"])),
    ("regression", np.array([40.0, 60.0, 50.0])),   # with groups: one group, no inner split keeps it whole
])
def test_a_training_fold_too_small_to_tune_takes_the_middle_of_the_grid(task, y):
    """A grouped outer fold can train on one subject; the probe must still fit, untuned, not crash."""
    x = np.random.default_rng(0).normal(size=(len(y), 4))
    cfg = LinearConfig(Cs=(100.0, 0.01, 1.0), alphas=(100.0, 0.01, 1.0))
    groups = ["site0"] * len(y) if len(y) > 1 else None
    probe = LinearProbe(task, cfg).fit(x, y, groups=groups)
    assert probe.sweep_ == {} and probe.best_param_ == 1.0
    assert probe.predict(x).shape == (len(y),)


def _grouped_data(task, n_groups=12, per_group=3, seed=0):
    """Longitudinal-like rows: 3 scans per subject, nearly identical, so a split inside a subject leaks."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_groups, 8)) * 3
    x = np.repeat(centres, per_group, 0) + 0.01 * rng.normal(size=(n_groups * per_group, 8))
    groups = np.repeat([f"sub{i:02d}" for i in range(n_groups)], per_group)
    if task == "classification":
        y = np.repeat(np.arange(n_groups) % 2, per_group)  # label unrelated to the features
    else:
        y = np.repeat(rng.normal(size=n_groups), per_group)
    return x, y, groups


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_inner_folds_keep_each_group_whole(monkeypatch, task):
    """With groups, every inner split of the penalty sweep keeps a group on one side (it split them)."""
    from slice2vol.eval import linear as linear_module

    x, y, groups = _grouped_data(task)
    seen = []
    original = linear_module._inner_splits

    def spy(*args, **kwargs):
        parts = original(*args, **kwargs)
        seen.extend(parts)
        return parts

    monkeypatch.setattr(linear_module, "_inner_splits", spy)
    probe = LinearProbe(task, LinearConfig(Cs=(0.01, 1.0), alphas=(0.01, 1.0))).fit(x, y, groups=groups)
    assert len(seen) == 3 and len(probe.sweep_) == 2
    for tr, va in seen:
        assert len(va) and not set(groups[tr]) & set(groups[va])


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_grouped_inner_folds_equal_scikit_learn_group_cross_validation(task):
    """The sweep with groups is scikit-learn's StratifiedGroupKFold / GroupKFold cross-validation."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, cross_val_score

    from slice2vol.eval.splits import shuffled_group_codes

    x, y, groups = _grouped_data(task)
    grid = (0.01, 0.1, 1.0)  # no C so large that log-loss clipping (1e-12 here, float eps in sklearn) differs
    cfg = LinearConfig(Cs=grid, alphas=grid)
    probe = LinearProbe(task, cfg, seed=4).fit(x, y, groups=groups)
    if task == "classification":
        cv = list(StratifiedGroupKFold(3, shuffle=True, random_state=4).split(x, y, groups))
        make, scoring = (lambda c: LogisticRegression(C=c, max_iter=cfg.max_iter)), "neg_log_loss"
    else:
        cv = list(GroupKFold(3).split(x, y, shuffled_group_codes(groups, 4)))
        make, scoring = (lambda a: Ridge(alpha=a)), "neg_mean_squared_error"
    reference = {p: float(cross_val_score(make_pipeline(StandardScaler(), make(p)), x, y, cv=cv,
                                          scoring=scoring).mean()) for p in grid}
    np.testing.assert_allclose([probe.sweep_[p] for p in grid], [reference[p] for p in grid], rtol=1e-7)


def test_ungrouped_inner_folds_ignore_the_groups_argument_default():
    """groups=None is the ungrouped probe, bit for bit (the scikit-learn references above hold)."""
    x, y = data()
    a = LinearProbe("classification", LinearConfig(Cs=(0.01, 1.0))).fit(x[:40], y[:40])
    b = LinearProbe("classification", LinearConfig(Cs=(0.01, 1.0))).fit(x[:40], y[:40], groups=None)
    assert a.sweep_ == b.sweep_
    np.testing.assert_array_equal(a.predict_proba(x[40:]), b.predict_proba(x[40:]))


def test_groups_of_another_length_are_refused():
    x, y = data(n=10)
    with pytest.raises(ValueError, match=r"^LinearProbe.fit: 9 groups for 10 training rows$"):
        LinearProbe("classification").fit(x, y, groups=["a"] * 9)


def test_a_near_constant_column_is_scaled_by_the_largest_sd_not_blown_up():
    """A column whose sd is under 1e-6 of the largest is treated as constant: divided by the largest sd
    (so it stays as small, relative to the others, as it was), neither by its own sd (rounding noise
    blown up to unit variance) nor by 1 (its size would then depend on the features' units)."""
    from slice2vol.eval.linear import _Standardizer

    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(scale=1000.0, size=50), 5.0 + rng.normal(scale=1e-4, size=50), rng.normal(size=50)]
    z = _Standardizer().fit(x).transform(x)
    sd = x.std(0)
    np.testing.assert_allclose(z[:, 0], (x[:, 0] - x[:, 0].mean()) / sd[0])
    np.testing.assert_allclose(z[:, 2], (x[:, 2] - x[:, 2].mean()) / sd[2])
    np.testing.assert_allclose(z[:, 1], (x[:, 1] - x[:, 1].mean()) / sd[0])
    # features that are all tiny (a random-init network's, sd ~1e-8) are standardised as usual
    tiny = x * 1e-11
    np.testing.assert_allclose(_Standardizer().fit(tiny).transform(tiny)[:, [0, 2]], z[:, [0, 2]], rtol=1e-6)

"""k-NN probe equals scikit-learn on the same features (cosine, temperature weights, majority)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

from slice2vol.eval.knn import KNNProbe, cosine_neighbours


def clustered(n=120, d=24, classes=3, seed=0):
    """Seeded clusters with overlap (so neighbours are not trivially one class)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    y = rng.integers(0, classes, n)
    x = centres[y] + 1.2 * rng.normal(size=(n, d))
    return x.astype(np.float32), y


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_classifier_matches_sklearn(k):
    x, y = clustered()
    xtr, ytr, xte = x[:80], y[:80], x[80:]
    T = 0.07
    ours = KNNProbe(ks=(k,), temperature=T).fit(xtr, ytr).predict(xte)
    ref_w = KNeighborsClassifier(k, metric="cosine", algorithm="brute",
                                 weights=lambda d: np.exp((1 - d) / T)).fit(xtr, ytr)
    np.testing.assert_allclose(ours[(k, "weighted")], ref_w.predict_proba(xte), atol=1e-5)
    ref_m = KNeighborsClassifier(k, metric="cosine", algorithm="brute").fit(xtr, ytr)
    np.testing.assert_allclose(ours[(k, "majority")], ref_m.predict_proba(xte), atol=1e-6)


def test_several_k_in_one_pass_and_string_labels():
    x, y = clustered(seed=1)
    names = np.array(["cn", "ad", "mci"])[y]
    probe = KNNProbe(ks=(5, 10, 20)).fit(x[:90], names[:90])
    out = probe.predict(x[90:])
    assert set(out) == {(k, v) for k in (5, 10, 20) for v in ("weighted", "majority")}
    assert list(probe.classes_) == ["ad", "cn", "mci"]
    for p in out.values():
        assert p.shape == (30, 3)
        np.testing.assert_allclose(p.sum(1), 1, atol=1e-9)
    # each k separately gives the same numbers
    single = KNNProbe(ks=(10,)).fit(x[:90], names[:90]).predict(x[90:])
    np.testing.assert_allclose(single[(10, "weighted")], out[(10, "weighted")])


def test_knn_regression_matches_sklearn():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 16)).astype(np.float32)
    y = x[:, 0] * 3 + rng.normal(size=100)
    T = 0.1
    ours = KNNProbe(ks=(7,), temperature=T, task="regression").fit(x[:70], y[:70]).predict(x[70:])
    ref = KNeighborsRegressor(7, metric="cosine", algorithm="brute",
                              weights=lambda d: np.exp((1 - d) / T)).fit(x[:70], y[:70])
    np.testing.assert_allclose(ours[(7, "weighted")], ref.predict(x[70:]), rtol=1e-5)
    ref_mean = KNeighborsRegressor(7, metric="cosine", algorithm="brute").fit(x[:70], y[:70])
    np.testing.assert_allclose(ours[(7, "mean")], ref_mean.predict(x[70:]), rtol=1e-5)


def test_k_larger_than_training_set_is_clipped():
    x, y = clustered(n=20)
    out = KNNProbe(ks=(50,)).fit(x[:10], y[:10]).predict(x[10:])
    np.testing.assert_allclose(out[(50, "majority")], np.tile(np.bincount(y[:10], minlength=3)[np.unique(y[:10])] / 10,
                                                             (10, 1)))


def test_cosine_neighbours_is_scale_invariant():
    x, _ = clustered(n=50)
    s1, i1 = cosine_neighbours(x[:40], x[40:], 5)
    s2, i2 = cosine_neighbours(x[:40] * 7.0, x[40:] * 0.1, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    assert np.all(s1 <= 1 + 1e-6) and np.all(np.diff(s1, axis=1) <= 1e-6)


def test_centring_uses_the_training_mean_and_equals_sklearn_on_centred_features():
    x, y = clustered(seed=3)
    x = x + 25.0  # one orthant, like pooled ReLU features: every cosine close to 1
    xtr, ytr, xte = x[:80], y[:80], x[80:]
    T = 0.07
    ours = KNNProbe(ks=(10,), temperature=T, center=True).fit(xtr, ytr)
    np.testing.assert_allclose(ours.mean_, xtr.mean(0), rtol=1e-6)  # the training fold's mean, not the test rows'
    out = ours.predict(xte)
    mean = xtr.mean(0)
    ref = KNeighborsClassifier(10, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1 - d) / T)).fit(xtr - mean, ytr)
    np.testing.assert_allclose(out[(10, "weighted")], ref.predict_proba(xte - mean), atol=1e-5)
    # why: un-centred, the temperature weights are ~uniform and "weighted" collapses onto "majority"
    raw = KNNProbe(ks=(10,), temperature=T, center=False).fit(xtr, ytr).predict(xte)
    assert np.abs(raw[(10, "weighted")] - raw[(10, "majority")]).max() < 0.05
    assert np.abs(out[(10, "weighted")] - out[(10, "majority")]).max() > 0.2


def test_a_k_larger_than_a_training_fold_is_the_same_k_in_every_fold_and_reported(tmp_path):
    """13 subjects in 3 folds train on 8 or 9: k=50 becomes k=8 in every fold (clipping per fold
    mixed k=8 and k=9 under one name), and the report's box says so; k=3 is untouched."""
    from types import SimpleNamespace

    from slice2vol.eval.cohort import LabelSplits
    from slice2vol.eval.knn import KNNConfig
    from slice2vol.eval.sets import EmbeddingSet
    from slice2vol.eval.splits import SplitConfig, make_splits
    from slice2vol.eval.tasks.base import TaskContext
    from slice2vol.eval.tasks.knn import TASK, used_ks

    x, y = clustered(n=13, classes=2)
    ids = [f"s{i:02d}" for i in range(13)]
    labels = np.array(["a", "b"])[y]
    splits = make_splits(ids, labels, "categorical", cfg=SplitConfig(n_folds=3, n_repeats=1, seed=0))
    assert sorted(len(f.train) for f in splits.folds) == [8, 9, 9]
    frame = LabelSplits("grp", "categorical", list(splits.subject_ids), labels[[ids.index(s) for s in splits.subject_ids]],
                        np.array(["a", "b"]), splits, tmp_path / "grp.json")
    assert used_ks((3, 50), frame) == {3: 3, 50: 8}
    cfg = SimpleNamespace(knn=KNNConfig(ks=(3, 50)), primary_k=3, seed=0, n_bootstrap=20, n_permutations=0,
                          splits=SimpleNamespace(n_folds=3), headline_estimate="auto")
    es = EmbeddingSet("enc", ids, x)
    ctx = TaskContext(cfg=cfg, base=tmp_path, out=tmp_path, frames={"grp": frame}, sets={"enc": es})
    for fold in splits.folds:
        x_train, x_test = es.fold_features(frame, fold)
        y_train = frame.y[frame.splits.positions(frame.ids, fold)[0]]
        out, _ = TASK.fit_predict(ctx, x_train, y_train, x_test, frame, fold)
        ref = KNNProbe(ks=(3, 8), temperature=0.07, center=True).fit(x_train, y_train).predict(x_test)
        np.testing.assert_allclose(out["k=50 majority"], ref[(8, "majority")])
        np.testing.assert_allclose(out["k=50 weighted"], ref[(8, "weighted")])
        np.testing.assert_allclose(out["k=3 weighted"], ref[(3, "weighted")])
    result = TASK.run(ctx)
    (note,) = result.skipped
    assert note == {"name": "knn k=50 (grp)", "reason": "k is larger than the smallest training fold (8 subjects)",
                    "substitute": "k=8 in every fold, shown under the name k=50"}
    assert {r["variant"] for r in result.rows} >= {"k=50 weighted", "k=3 weighted"}

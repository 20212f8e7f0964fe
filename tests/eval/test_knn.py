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

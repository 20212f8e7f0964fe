"""The batched (count-weighted) bootstrap and permutation tests equal the one-call-per-draw loop.

The reference is the loop itself: the same random stream, the scalar metrics (which
``test_metrics.py`` checks against scikit-learn) on each expanded sample. Wrapping a metric in a
plain function forces the loop; a :class:`Metric` takes the batched path.
"""

from __future__ import annotations

import numpy as np
import pytest

from slice2vol.eval.metrics import (CLASSIFICATION_METRICS, REGRESSION_METRICS, bootstrap_ci, fold_index,
                                    metric_fn, paired_test)
from slice2vol.eval.weighted import binary_auc, draw_weights


def _data(kind: str, n: int = 37, n_classes: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind == "continuous":
        y = rng.normal(50, 10, n)
        a = y[None] + rng.normal(0, 6, (2, n))
        b = y[None] + rng.normal(0, 9, (2, n))
        return y, a, b, None
    classes = np.array(["a", "b", "c"][:n_classes])
    # a rare last class: some bootstrap draws miss it (the renormalising fallback of multi-class AUC)
    p = [0.45, 0.55] if n_classes == 2 else [0.5, 0.44, 0.06]
    y = classes[rng.choice(n_classes, n, p=p)]
    def proba():
        raw = rng.dirichlet(np.ones(n_classes), (2, n))
        raw[:, np.arange(n), np.searchsorted(classes, y)] += 0.4
        raw = np.round(raw, 1)  # coarse values: many ties
        return raw / raw.sum(-1, keepdims=True)
    return y, proba(), proba(), classes


def _folds(n: int, n_repeats: int = 2, k: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tests = []
    for r in range(n_repeats):
        for part in np.array_split(rng.permutation(n), k):
            tests.append((r, np.sort(part)))
    return fold_index(n, tests)


CASES = ([("categorical", 2, m) for m in CLASSIFICATION_METRICS] + [("categorical", 3, m) for m in CLASSIFICATION_METRICS]
         + [("continuous", 0, m) for m in REGRESSION_METRICS])


@pytest.mark.parametrize("kind,n_classes,metric", CASES)
@pytest.mark.parametrize("fold_mean", [False, True])
def test_batched_bootstrap_and_paired_test_equal_the_loop(kind, n_classes, metric, fold_mean):
    y, a, b, classes = _data(kind, n_classes=n_classes, seed=n_classes)
    fn = metric_fn(metric, kind, classes)
    loop = lambda yy, pp: fn(yy, pp)  # noqa: E731  (a plain callable takes the loop)
    fold_of = _folds(len(y)) if fold_mean else None
    fast = bootstrap_ci(y, a, fn, n_boot=300, seed=3, fold_of=fold_of)
    ref = bootstrap_ci(y, a, loop, n_boot=300, seed=3, fold_of=fold_of)
    np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=1e-12)
    fast_p = paired_test(y, a, b, fn, n_boot=200, n_perm=200, seed=5, fold_of=fold_of)
    ref_p = paired_test(y, a, b, loop, n_boot=200, n_perm=200, seed=5, fold_of=fold_of)
    for key in ("delta", "ci_low", "ci_high", "p_value"):
        assert fast_p[key] == pytest.approx(ref_p[key], rel=1e-9, abs=1e-12), key


def test_weighted_auc_equals_auc_of_the_expanded_sample_with_ties():
    rng = np.random.default_rng(1)
    score = rng.integers(0, 4, 30).astype(float)           # heavy ties
    pos = rng.random(30) < 0.4
    idx = rng.integers(0, 30, (50, 30))
    w = draw_weights(idx, 30)
    ours = binary_auc(pos, score[None], w)
    fn = metric_fn("roc_auc", "categorical", [False, True])
    proba = np.stack([1 - score / 4, score / 4], 1)
    for i in range(50):
        assert ours[i] == pytest.approx(fn(pos[idx[i]], proba[idx[i]]), nan_ok=True)
    # a draw without negatives is NaN, like the scalar metric
    assert np.isnan(binary_auc(pos, score[None], pos[None].astype(float)))[0]


def test_draw_weights_counts_each_drawn_position():
    idx = np.array([[0, 0, 2], [1, 2, 2]])
    np.testing.assert_array_equal(draw_weights(idx, 3), [[2, 0, 1], [0, 1, 2]])


def test_identical_encoders_still_give_p_one_in_batches():
    y, a, _, classes = _data("categorical", n_classes=2)
    res = paired_test(y, a, a.copy(), metric_fn("roc_auc", "categorical", classes), n_boot=100, n_perm=300)
    assert res["p_value"] == 1.0 and res["delta"] == 0.0

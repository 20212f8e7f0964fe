"""Result rows: a fold-mean headline carries the fold-mean interval and test; Holm per table."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from slice2vol.eval.estimates import add_holm, paired_row, probe_rows
from slice2vol.eval.metrics import bootstrap_ci, fold_index, metric_fn, paired_test

CLASSES = np.array([0, 1])
N, FOLDS, REPEATS = 40, 4, 2


def offset_folds(seed: int = 0):
    """Two repeats of 4 folds whose scores rank the subjects of a fold well but sit on a fold's own
    offset: pooled and fold-mean AUC (and their intervals) differ clearly."""
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], N // 2)
    fold_of = np.stack([rng.permutation(np.arange(N) % FOLDS) for _ in range(REPEATS)])
    score = 0.25 * y[None] + 0.4 * fold_of + rng.normal(0, 0.2, (REPEATS, N))
    score = (score - score.min()) / (score.max() - score.min())
    proba = np.stack([1 - score, score], -1)  # (R, N, 2)
    tests = [(r, np.flatnonzero(fold_of[r] == k)) for r in range(REPEATS) for k in range(FOLDS)]
    assert np.array_equal(fold_index(N, tests), fold_of)
    return y, proba, fold_of, tests


def test_a_fold_mean_row_reports_the_fold_mean_interval():
    y, proba, fold_of, tests = offset_folds()
    # per-fold AUCs by scikit-learn, as the task's shared loop records them
    fold_aucs = [roc_auc_score(y[te], proba[r, te, 1]) for r, te in tests]
    fold_metrics = {"v": {m: [0.5] * len(tests) for m in ("accuracy", "balanced_accuracy", "macro_f1")}}
    fold_metrics["v"]["roc_auc"] = fold_aucs
    rows = probe_rows("linear", "lab", "enc", "categorical", CLASSES, y, {"v": proba}, fold_metrics, fold_of,
                      n_folds=FOLDS, n_boot=200, seed=3)
    (row,) = [r for r in rows if r["metric"] == "roc_auc"]
    fn = metric_fn("roc_auc", "categorical", CLASSES)
    pooled = bootstrap_ci(y, proba, fn, n_boot=200, seed=3)
    fold_mean = bootstrap_ci(y, proba, fn, n_boot=200, seed=3, fold_of=fold_of)
    assert pooled[1:] != pytest.approx(fold_mean[1:], abs=1e-3)  # the two intervals are distinguishable
    assert row["estimate_kind"] == "fold_mean"
    assert row["estimate"] == pytest.approx(np.mean(fold_aucs)) == pytest.approx(fold_mean[0])
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(fold_mean[1:])
    assert (row["pooled"], row["pooled_ci_low"], row["pooled_ci_high"]) == pytest.approx(pooled)
    # a pooled headline (accuracy) reports the pooled interval
    (acc,) = [r for r in rows if r["metric"] == "accuracy"]
    acc_ref = bootstrap_ci(y, proba, metric_fn("accuracy", "categorical", CLASSES), n_boot=200, seed=3)
    assert acc["estimate_kind"] == "pooled"
    assert (acc["estimate"], acc["ci_low"], acc["ci_high"]) == pytest.approx(acc_ref)


def test_a_fold_mean_paired_row_is_the_fold_mean_paired_test():
    y, proba, fold_of, _ = offset_folds()
    rng = np.random.default_rng(5)
    other = np.clip(proba + rng.normal(0, 0.15, proba.shape), 0, None)
    other /= other.sum(-1, keepdims=True)
    fn = metric_fn("roc_auc", "categorical", CLASSES)
    kwargs = dict(n_boot=100, n_perm=100, seed=2)
    row = paired_row(task="linear", label="lab", variant="v", metric="roc_auc", encoder="enc", reference="ref", y=y,
                     preds=proba, ref_preds=other, classes=CLASSES, kind="categorical", fold_of=fold_of, **kwargs)
    fold_mean = paired_test(y, proba, other, fn, fold_of=fold_of, **kwargs)
    pooled = paired_test(y, proba, other, fn, **kwargs)
    assert fold_mean["delta"] != pytest.approx(pooled["delta"], abs=1e-3)
    assert row["estimate_kind"] == "fold_mean"
    for key in ("delta", "ci_low", "ci_high", "p_value"):
        assert row[key] == pytest.approx(fold_mean[key]), key
    # MAE is a pooled headline: the same call gives the pooled test
    yc = rng.normal(size=N)
    a, b = (yc + rng.normal(0, 0.3, (REPEATS, N))), (yc + rng.normal(0, 0.5, (REPEATS, N)))
    mae = paired_row(task="linear", label="age", variant="v", metric="mae", encoder="enc", reference="ref", y=yc,
                     preds=a, ref_preds=b, classes=None, kind="continuous", fold_of=fold_of, **kwargs)
    pooled_mae = paired_test(yc, a, b, metric_fn("mae", "continuous"), **kwargs)
    assert mae["estimate_kind"] == "pooled"
    assert [mae[k] for k in ("delta", "ci_low", "ci_high", "p_value")] == pytest.approx(
        [pooled_mae[k] for k in ("delta", "ci_low", "ci_high", "p_value")])


def _paired(label, p, encoder, task="linear", variant="v", metric="roc_auc"):
    return {"task": task, "label": label, "variant": variant, "metric": metric, "encoder": encoder, "p_value": p}


def test_holm_adjusts_within_a_table_and_not_across_tables():
    # two tables (labels) with one comparison each: nothing to adjust
    rows = add_holm([_paired("sex", 0.03, "a"), _paired("age", 0.04, "a")])
    assert [r["p_holm"] for r in rows] == pytest.approx([0.03, 0.04])
    # the same two p-values in one table: Holm by hand, m = 2: 2 * 0.03 = 0.06, max(0.06, 1 * 0.04) = 0.06
    rows = add_holm([_paired("sex", 0.03, "a"), _paired("sex", 0.04, "b")])
    assert [r["p_holm"] for r in rows] == pytest.approx([0.06, 0.06])
    # other variant or metric is another table too; three in one table: 3 * 0.01, 2 * 0.02, 1 * 0.5
    rows = add_holm([_paired("sex", 0.01, "a"), _paired("sex", 0.5, "b"), _paired("sex", 0.02, "c"),
                     _paired("sex", 0.03, "a", variant="w"), _paired("sex", 0.04, "a", metric="mae"),
                     _paired("sex", 0.045, "a", task="knn")])
    assert [r["p_holm"] for r in rows] == pytest.approx([0.03, 0.5, 0.04, 0.03, 0.04, 0.045])


def test_a_paired_row_without_permutations_is_not_tested_not_p_1():
    """n_perm=0 gave p = 1 (0 extreme of 0, plus one), read as "not significant"; it is NaN: no test."""
    y, proba, fold_of, _ = offset_folds()
    row = paired_row(task="linear", label="lab", variant="v", metric="roc_auc", encoder="enc", reference="ref", y=y,
                     preds=proba, ref_preds=proba[::-1], classes=CLASSES, kind="categorical", fold_of=fold_of,
                     n_boot=50, n_perm=0, seed=0)
    assert np.isnan(row["p_value"]) and np.isfinite(row["delta"])
    assert np.isnan(add_holm([row])[0]["p_holm"])


def test_the_summary_takes_each_sets_own_paired_row_and_its_holm_p():
    from slice2vol.eval.estimates import summary

    def row(encoder, estimate, metric="roc_auc", task="linear"):
        return {"label": "sex", "task": task, "variant": "logreg", "metric": metric, "encoder": encoder,
                "estimate": estimate, "ci_low": estimate - 0.1, "ci_high": estimate + 0.1, "estimate_kind": "pooled"}

    def test(encoder, delta, p, p_holm, metric="roc_auc"):
        return {"label": "sex", "task": "linear", "variant": "logreg", "metric": metric, "encoder": encoder,
                "delta": delta, "ci_low": delta - 0.05, "ci_high": delta + 0.05, "p_value": p, "p_holm": p_holm}

    rows = [row("ref", 0.7), row("a", 0.8), row("b", 0.6), row("a", 0.9, task="knn")]
    paired = [test("a", 0.1, 0.01, 0.02, metric="balanced_accuracy"), test("b", -0.1, 0.03, 0.06),
              test("a", 0.1, 0.01, 0.02)]
    out = summary(rows, paired, {"sex": ("linear", "logreg", "roc_auc")})
    assert [r["encoder"] for r in out] == ["ref", "a", "b"]  # the knn row is not the primary task
    ref, a, b = out
    assert ref["delta"] is None and ref["p_holm"] is None
    assert (a["estimate"], a["delta"], a["delta_ci_low"], a["p_holm"]) == (0.8, 0.1, 0.05, 0.02)
    assert (b["delta"], b["p_holm"], b["lower_is_better"]) == (-0.1, 0.06, False)

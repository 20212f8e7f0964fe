"""The statistics of the dense-probe result rows against independent references: subject-cluster
bootstrap intervals recomputed here with scikit-learn and numpy (slices and lesions of one subject are
resampled together), pooled rates (not means of rates), and fold mean/sd by hand (ddof 1).

Intervals are compared within a tolerance of a quarter of the reference interval's width: the
reference uses its own random draws, and 1,000 resamples put the 2.5% quantile within a few hundredths.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

N_BOOT = 1000


def _clustered(n_subjects=24, per_subject=60, seed=0):
    """Slices of ``n_subjects`` subjects with a strong subject effect on the scores (as real slices of one
    head share its anatomy): a slice bootstrap would give a far narrower interval than a subject one."""
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(n_subjects), per_subject)
    # subjects differ in how many of their slices are lesioned and in their score level
    truth = rng.random(owner.size) < rng.uniform(0, 0.7, n_subjects)[owner]
    scores = rng.normal(size=n_subjects)[owner] + 0.8 * truth + rng.normal(scale=0.3, size=owner.size)
    fold_of = np.arange(n_subjects) % 4
    return truth, scores, owner, fold_of


def _cluster_interval(stat, n, seed=123):
    rng = np.random.default_rng(seed)
    values = [stat(rng.integers(0, n, n)) for _ in range(N_BOOT)]
    values = np.asarray([v for v in values if np.isfinite(v)])
    return np.quantile(values, 0.025), np.quantile(values, 0.975)


def _close(row, ref):
    width = ref[1] - ref[0]
    assert width > 0.05
    # a slice (not subject) bootstrap of these data gives a quarter of the width
    assert abs(row["ci_low"] - ref[0]) < 0.25 * width and abs(row["ci_high"] - ref[1]) < 0.25 * width, (row, ref)


def _subject_auc(truth, scores, owner):
    """The pooled AUROC (scikit-learn) of the slices of a draw of subjects, repeats counted again."""
    members = [np.flatnonzero(owner == i) for i in range(owner.max() + 1)]

    def stat(draw):
        idx = np.concatenate([members[i] for i in draw])
        return roc_auc_score(truth[idx], scores[idx]) if 0 < truth[idx].sum() < idx.size else np.nan

    return stat


def test_slice_auroc_row_resamples_subjects_and_takes_the_fold_sd_with_ddof_1():
    from slice2vol.eval.tasks.anomaly import _cluster_auc_row

    truth, scores, owner, fold_of = _clustered()
    n = fold_of.size
    row = _cluster_auc_row("anomaly", "slice-level", "enc", "v", truth, scores, owner, n, fold_of, 4, N_BOOT, 0)
    assert row["estimate"] == pytest.approx(roc_auc_score(truth, scores))
    _close(row, _cluster_interval(_subject_auc(truth, scores, owner), n))
    folds = [roc_auc_score(truth[np.isin(owner, np.flatnonzero(fold_of == f))],
                           scores[np.isin(owner, np.flatnonzero(fold_of == f))]) for f in range(4)]
    assert row["fold_mean"] == pytest.approx(np.mean(folds))
    assert row["fold_sd"] == pytest.approx(np.std(folds, ddof=1))


def test_pooled_voxel_auroc_interval_resamples_whole_subjects():
    from slice2vol.eval.dense_bench import _pooled_auroc

    truth, scores, owner, fold_of = _clustered(seed=1)
    n = fold_of.size
    tests = [np.flatnonzero(fold_of == f) for f in range(4)]
    out = _pooled_auroc(scores, truth, owner, n, 4096, N_BOOT, 0, tests=tests)
    assert out["estimate"] == pytest.approx(roc_auc_score(truth, scores))
    _close(out, _cluster_interval(_subject_auc(truth, scores, owner), n))


def test_detection_rate_row_pools_lesions_and_resamples_subjects():
    """Subjects with one lesion find it, subjects with nine find none: the pooled rate is 10 / 100 =
    0.1, the mean of per-subject rates 0.5; the interval must be about the pooled rate."""
    from slice2vol.eval.tasks.anomaly import _ratio_row

    rng = np.random.default_rng(2)
    totals = np.r_[np.ones(10), np.full(10, 9.0), np.full(4, 3.0)]
    hits = np.r_[np.ones(10), np.zeros(10), rng.integers(0, 4, 4).astype(float)]
    fold_of = np.arange(totals.size) % 4
    row = _ratio_row("anomaly", "region-level", "enc", "v", "detection_rate", hits, totals, fold_of, 4, N_BOOT, 0)
    assert row["estimate"] == pytest.approx(hits.sum() / totals.sum())
    assert row["n_events"] == int(totals.sum())
    _close(row, _cluster_interval(lambda d: hits[d].sum() / totals[d].sum(), totals.size))
    folds = [hits[fold_of == f].sum() / totals[fold_of == f].sum() for f in range(4)]
    assert row["fold_mean"] == pytest.approx(np.mean(folds)) and row["fold_sd"] == pytest.approx(np.std(folds, ddof=1))


def test_dense_row_fold_values_are_per_fold_and_the_sd_has_ddof_1():
    from slice2vol.eval.dense_tasks import _row

    rng = np.random.default_rng(3)
    fold_of = np.arange(30) % 3
    values = rng.normal(size=30) + fold_of  # folds differ
    values[4] = np.nan  # a subject without a value is left out of its fold
    row = _row("segmentation", "dice", "enc", "v", "dice", values, fold_of, 3, N_BOOT, 0)
    folds = [np.nanmean(values[fold_of == f]) for f in range(3)]
    assert row["fold_mean"] == pytest.approx(np.mean(folds))
    assert row["fold_sd"] == pytest.approx(np.std(folds, ddof=1))
    assert row["estimate"] == pytest.approx(np.nanmean(values)) and row["n_subjects"] == 29
    ok = ~np.isnan(values)
    _close(row, _cluster_interval(lambda d: values[ok][d].mean(), int(ok.sum())))


def test_paired_difference_uses_only_subjects_both_sides_have():
    """A structure one encoder never predicted gives it a NaN Dice for that subject: the pair is left out,
    the difference is not NaN."""
    from slice2vol.eval.dense_tasks import _paired

    rng = np.random.default_rng(4)
    a, b = rng.random(20), rng.random(20)
    a[3], b[7] = np.nan, np.nan
    out = _paired("segmentation", "dice", "v", "dice", "enc", "ref", a, b, 500, 200, 0)
    ok = np.isfinite(a) & np.isfinite(b)
    assert out["n_subjects"] == 18
    assert out["delta"] == pytest.approx(np.mean(a[ok] - b[ok]))

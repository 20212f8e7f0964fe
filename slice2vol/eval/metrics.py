"""Metrics with uncertainty: fold mean ± sd, subject-level bootstrap intervals, paired tests, Holm.

Predictions are kept out-of-fold: for each repeat every subject is predicted once by the model that
did not see it, giving ``preds`` of shape (R, N) (regression, or a class-probability score) or
(R, N, C) (class probabilities). A bootstrap sample draws subjects with replacement and the metric
is averaged over repeats; a paired comparison of two encoders uses the same draws (bootstrap) or
swaps the two encoders' predictions per subject (permutation), which is what "is A better than B on
these subjects?" needs.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "macro_f1")
REGRESSION_METRICS = ("mae", "rmse", "pearson_r", "r2")
LOWER_IS_BETTER = {"mae", "rmse"}


def _binary_auc(pos: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half; NaN when one class is absent.

    Average ranks by one stable sort (what ``scipy.stats.rankdata`` computes, ~3x faster here: the
    bootstrap and permutation tests call this 10^4-10^5 times per table).
    """
    pos = np.asarray(pos, dtype=bool)
    score = np.asarray(score)
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(score, kind="mergesort")
    ordered = score[order]
    start = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    counts = np.diff(np.r_[start, len(ordered)])
    ranks = np.empty(len(ordered))
    ranks[order] = np.repeat(start + (counts + 1) / 2.0, counts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _classification_metric(name: str, y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    # numpy versions (checked against scikit-learn in the tests): the bootstrap calls them 10^4 times
    if name == "roc_auc":
        if len(classes) == 2:
            return _binary_auc(y_true == classes[1], proba[:, 1])
        present = [c for c in range(len(classes)) if np.any(y_true == classes[c])]
        if len(present) < 2:
            return math.nan
        sub = proba[:, present] / np.clip(proba[:, present].sum(1, keepdims=True), 1e-12, None)
        return float(np.mean([_binary_auc(y_true == classes[c], sub[:, j]) for j, c in enumerate(present)]))
    pred = classes[np.argmax(proba, axis=1)]
    if name == "accuracy":
        return float(np.mean(pred == y_true))
    if name == "balanced_accuracy":
        return float(np.mean([np.mean(pred[y_true == c] == c) for c in classes if np.any(y_true == c)]))
    if name == "macro_f1":
        f1 = []
        for c in classes:
            tp = np.sum((pred == c) & (y_true == c))
            denom = np.sum(pred == c) + np.sum(y_true == c)
            f1.append(2 * tp / denom if denom else 0.0)
        return float(np.mean(f1))
    raise KeyError(f"unknown classification metric {name!r}; known: {CLASSIFICATION_METRICS}")


def classification_metrics(y_true: Sequence, proba: np.ndarray, classes: Sequence) -> dict[str, float]:
    """Accuracy, balanced accuracy, ROC AUC (one-vs-rest macro for > 2 classes), macro F1.

    Args:
        y_true: (N,) labels.
        proba: (N, C) class probabilities, columns in the order of ``classes``.
        classes: (C,) class labels.
    """
    y_true, proba, classes = np.asarray(y_true), np.asarray(proba), np.asarray(classes)
    return {m: _classification_metric(m, y_true, proba, classes) for m in CLASSIFICATION_METRICS}


def regression_metrics(y_true: Sequence, y_pred: Sequence) -> dict[str, float]:
    """MAE, RMSE, Pearson r and R^2 of (N,) predictions; r is NaN for a target or prediction
    constant up to rounding, R^2 for such a target."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    err = y_pred - y_true
    from slice2vol.eval.weighted import near_constant

    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    # a prediction constant up to rounding has no correlation to report (np.corrcoef would give a
    # random +-1 from the last bits); the same test as the bootstrap's weighted form
    y_const = len(y_true) == 0 or bool(near_constant(y_true))
    if not y_const and not near_constant(y_pred):
        r = float(np.clip(np.corrcoef(y_true, y_pred)[0, 1], -1.0, 1.0))
    else:
        r = math.nan
    return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2))),
            "pearson_r": r, "r2": math.nan if y_const else float(1 - np.sum(err ** 2) / ss_tot)}


class Metric:
    """One named metric ``(y_true (N,), preds (N,) or (N, C)) -> float``, plus its count-weighted
    batch form (:meth:`weighted`) that the bootstrap and permutation tests evaluate for all draws
    at once (:mod:`slice2vol.eval.weighted`)."""

    def __init__(self, name: str, kind: str, classes: Sequence | None = None) -> None:
        known = CLASSIFICATION_METRICS if kind == "categorical" else REGRESSION_METRICS
        if name not in known:
            raise KeyError(f"unknown {kind} metric {name!r}; known: {known}")
        self.name, self.kind = name, kind
        self.classes = np.asarray(classes) if classes is not None else None

    def __call__(self, y, p) -> float:
        if self.kind == "categorical":
            return _classification_metric(self.name, np.asarray(y), np.asarray(p), self.classes)
        return regression_metrics(y, p)[self.name]

    def weighted(self, y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
        """(B,) metric of every row of counts ``w`` (B, N) on predictions ``p`` ((B or 1, N[, C]))."""
        from slice2vol.eval import weighted

        if self.kind == "categorical":
            return weighted.classification(self.name, y, p, w, self.classes)
        return weighted.regression(self.name, y, p, w)

    def __repr__(self) -> str:
        return f"Metric({self.name!r}, {self.kind!r})"


def metric_fn(name: str, kind: str, classes: Sequence | None = None) -> Metric:
    """A function ``(y_true (N,), preds (N,) or (N, C)) -> float`` for one metric (a :class:`Metric`)."""
    return Metric(name, kind, classes)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation, ignoring NaN (sd is 0 for one value)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _over_repeats(fn, y: np.ndarray, preds: np.ndarray, idx: np.ndarray, fold_of: np.ndarray | None = None) -> float:
    """The metric of subjects ``idx``: pooled per repeat (``fold_of`` None) or averaged over the
    test folds of every repeat (``fold_of`` (R, N): each subject's test fold in each repeat)."""
    if fold_of is None:
        vals = [fn(y[idx], preds[r][idx]) for r in range(len(preds))]
    else:
        vals = []
        for r in range(len(preds)):
            folds = fold_of[r][idx]
            for k in np.unique(folds):
                sel = idx[folds == k]
                vals.append(fn(y[sel], preds[r][sel]))
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


def _over_repeats_weighted(fn: Metric, y: np.ndarray, preds: np.ndarray, w: np.ndarray,
                           fold_of: np.ndarray | None = None) -> np.ndarray:
    """:func:`_over_repeats` for B draws at once: ``w`` (B, N) counts, ``preds`` (R, N[, C]) shared by
    every draw or (B, R, N[, C]) one per draw (permutations). Returns (B,)."""
    batched = preds.ndim == w.ndim + (2 if fn.kind == "categorical" else 1)
    vals = []
    for r in range(preds.shape[1] if batched else len(preds)):
        p = preds[:, r] if batched else preds[r][None]
        if fold_of is None:
            vals.append(fn.weighted(y, p, w))
            continue
        for k in np.unique(fold_of[r]):
            # folds without a drawn subject give NaN and are left out, as the scalar loop skips them
            vals.append(fn.weighted(y, p, w * (fold_of[r] == k)))
    vals = np.stack(vals, 1)
    ok = np.isfinite(vals)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok.any(1), np.where(ok, vals, 0).sum(1) / ok.sum(1), np.nan)


def _draws(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """(n_boot, n) subject positions, drawn one draw at a time (the same stream as the scalar loop)."""
    return np.stack([rng.integers(0, n, n) for _ in range(n_boot)]) if n_boot else np.zeros((0, n), np.int64)


_CHUNK = 250  # draws evaluated together: bounds the (chunk, R, N, C) temporaries of large cohorts


def fold_index(n_subjects: int, tests: Sequence[tuple[int, np.ndarray]]) -> np.ndarray:
    """(R, N) test-fold number of every subject in every repeat, from ``(repeat, test positions)`` per fold."""
    n_repeats = 1 + max(r for r, _ in tests)
    out = np.full((n_repeats, n_subjects), -1, dtype=np.int64)
    counters = [0] * n_repeats
    for r, te in tests:
        out[r, te] = counters[r]
        counters[r] += 1
    return out


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1; NaN stays NaN)."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(len(p), math.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    running = 0.0
    for rank, i in enumerate(finite[np.argsort(p[finite], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def check_level(level: float) -> float:
    """A confidence level strictly between 0 and 1 (0.95), refused in words otherwise."""
    try:
        ok = 0.0 < float(level) < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"confidence level must be a number strictly between 0 and 1 (e.g. 0.95), got {level!r}")
    return float(level)


def _percentile_interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    """(low, high) percentile interval of the finite values of ``stats``; NaN when there are none."""
    stats = np.asarray(stats, dtype=np.float64)
    stats = stats[np.isfinite(stats)]
    if len(stats) == 0:
        return math.nan, math.nan
    a = (1 - level) / 2
    return float(np.quantile(stats, a)), float(np.quantile(stats, 1 - a))


def bootstrap_ci(y_true: Sequence, preds: np.ndarray, fn: Callable, *, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95, fold_of: np.ndarray | None = None) -> tuple[float, float, float]:
    """Subject-level percentile bootstrap interval of a metric of out-of-fold predictions.

    Args:
        y_true: (N,) targets.
        preds: (R, N) or (R, N, C) out-of-fold predictions of R repeats.
        fn: metric ``(y, p) -> float``.
        fold_of: (R, N) test fold of each subject (:func:`fold_index`): the estimate is then the mean
            over folds and repeats of the per-fold metric (each draw recomputes every fold's metric on
            the drawn subjects of that fold), instead of the metric of the pooled predictions.

    Returns:
        (point estimate on all subjects, lower, upper).
    """
    check_level(level)
    y = np.asarray(y_true)
    preds = np.asarray(preds)
    n = len(y)
    point = _over_repeats(fn, y, preds, np.arange(n), fold_of)
    rng = np.random.default_rng(seed)
    if isinstance(fn, Metric):
        from slice2vol.eval.weighted import draw_weights

        idx = _draws(rng, n, n_boot)
        stats = np.concatenate([_over_repeats_weighted(fn, y, preds, draw_weights(idx[i:i + _CHUNK], n), fold_of)
                                for i in range(0, n_boot, _CHUNK)] or [np.zeros(0)])
    else:  # any other callable: one call per draw
        stats = np.array([_over_repeats(fn, y, preds, rng.integers(0, n, n), fold_of) for _ in range(n_boot)])
    return (point, *_percentile_interval(stats, level))


def paired_test(y_true: Sequence, preds_a: np.ndarray, preds_b: np.ndarray, fn: Callable, *,
                n_boot: int = 1000, n_perm: int = 1000, seed: int = 0, level: float = 0.95,
                fold_of: np.ndarray | None = None) -> dict:
    """Is encoder A better than B on the same subjects and splits?

    Args:
        y_true: (N,) targets.
        preds_a, preds_b: (R, N[, C]) out-of-fold predictions of the two encoders on the same splits.
        fn: metric ``(y, p) -> float``.
        fold_of: compare fold-mean estimates instead of pooled ones (see :func:`bootstrap_ci`).

    Returns:
        ``delta`` = metric(A) - metric(B), its paired-bootstrap interval ``ci_low``/``ci_high``, and
        ``p_value`` of a two-sided paired permutation test that swaps A and B per subject
        (identical predictions give p = 1).
    """
    y = np.asarray(y_true)
    a, b = np.asarray(preds_a), np.asarray(preds_b)
    if a.shape != b.shape:
        raise ValueError(f"paired predictions differ in shape: {a.shape} vs {b.shape}")
    check_level(level)
    n = len(y)
    full = np.arange(n)
    rng = np.random.default_rng(seed)
    if n == 0:  # nothing both encoders scored: no test (a permutation count would read as p = 1/(P+1))
        return {"delta": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan}
    if isinstance(fn, Metric):
        return _paired_weighted(fn, y, a, b, rng, n_boot, n_perm, level, fold_of)
    delta = _over_repeats(fn, y, a, full, fold_of) - _over_repeats(fn, y, b, full, fold_of)
    if not np.isfinite(delta):
        return {"delta": float(delta), "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan}
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        boots.append(_over_repeats(fn, y, a, idx, fold_of) - _over_repeats(fn, y, b, idx, fold_of))
    ci = _percentile_interval(np.asarray(boots), level)
    extreme = 0
    for _ in range(n_perm):
        swap = rng.random(n) < 0.5
        mask = swap.reshape((1, n) + (1,) * (a.ndim - 2))
        pa, pb = np.where(mask, b, a), np.where(mask, a, b)
        d = _over_repeats(fn, y, pa, full, fold_of) - _over_repeats(fn, y, pb, full, fold_of)
        # small tolerance: float noise must not make identical encoders "significant"
        if abs(d) >= abs(delta) - 1e-12:
            extreme += 1
    p_value = (1 + extreme) / (1 + n_perm)
    return {"delta": float(delta), "ci_low": ci[0], "ci_high": ci[1], "p_value": float(p_value)}


def _paired_weighted(fn: Metric, y, a, b, rng, n_boot, n_perm, level, fold_of) -> dict:
    """:func:`paired_test` with every draw and permutation evaluated in batches (same random stream,
    same numbers as the loop up to float rounding)."""
    from slice2vol.eval.weighted import draw_weights

    n = len(y)
    ones = np.ones((1, n))
    delta = float(_over_repeats_weighted(fn, y, a, ones, fold_of)[0] - _over_repeats_weighted(fn, y, b, ones, fold_of)[0])
    if not np.isfinite(delta):  # undefined metric on one side: no test, not the smallest p there is
        return {"delta": delta, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan}
    idx = _draws(rng, n, n_boot)
    boots = []
    for i in range(0, n_boot, _CHUNK):
        w = draw_weights(idx[i:i + _CHUNK], n)
        boots.append(_over_repeats_weighted(fn, y, a, w, fold_of) - _over_repeats_weighted(fn, y, b, w, fold_of))
    ci = _percentile_interval(np.concatenate(boots) if boots else np.zeros(0), level)
    swaps = np.stack([rng.random(n) < 0.5 for _ in range(n_perm)]) if n_perm else np.zeros((0, n), bool)
    extreme = 0
    for i in range(0, n_perm, _CHUNK):
        mask = swaps[i:i + _CHUNK].reshape((-1, 1, n) + (1,) * (a.ndim - 2))   # (P, 1, N[, 1])
        pa, pb = np.where(mask, b[None], a[None]), np.where(mask, a[None], b[None])
        w = np.ones((len(mask), n))
        d = _over_repeats_weighted(fn, y, pa, w, fold_of) - _over_repeats_weighted(fn, y, pb, w, fold_of)
        # small tolerance: float noise must not make identical encoders "significant"
        extreme += int(np.sum(np.abs(d) >= abs(delta) - 1e-12))
    p_value = (1 + extreme) / (1 + n_perm)
    return {"delta": delta, "ci_low": ci[0], "ci_high": ci[1], "p_value": float(p_value)}

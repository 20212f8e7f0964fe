"""Count-weighted metrics for many bootstrap draws or permutations at once.

A bootstrap draw of N subjects with replacement is the same as giving every subject a count weight
(how often it was drawn): the metric of the drawn sample equals the weighted metric of the original
one. Evaluating 1,000 draws is then a handful of array operations on a (B, N) weight matrix instead
of 1,000 Python calls per metric, fold and repeat (the loop used to take half of a benchmark's
wall time). Every function here returns exactly what the scalar metric of
:mod:`slice2vol.eval.metrics` returns on the expanded sample (up to float rounding; checked in
``tests/eval/test_weighted_metrics.py``), including NaN where the scalar one gives NaN.

Shapes: ``y`` (N,) targets; ``p`` (B, N) predictions or scores, or (B, N, C) class probabilities
(B may be 1 and broadcast); ``w`` (B, N) non-negative counts. Results are (B,).
"""

from __future__ import annotations

import numpy as np


def binary_auc(pos: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUC, ties counted half; NaN where a row has no positive or no negative.

    Args:
        pos: (N,) bool, the positive class.
        score: (B, N) scores (broadcast against ``w``).
        w: (B, N) counts.
    """
    score, w = np.broadcast_arrays(np.asarray(score, np.float64), np.asarray(w, np.float64))
    b, n = w.shape
    order = np.argsort(score, axis=1, kind="stable")
    s = np.take_along_axis(score, order, 1)
    wp = np.take_along_axis(w * pos, order, 1)
    wn = np.take_along_axis(w * ~pos, order, 1)
    # tie groups of equal scores: negatives strictly below count 1, negatives in the same group 1/2
    start = np.ones((b, n), bool)
    start[:, 1:] = s[:, 1:] != s[:, :-1]
    end = np.ones((b, n), bool)
    end[:, :-1] = start[:, 1:]
    cols = np.arange(n)
    first = np.maximum.accumulate(np.where(start, cols, 0), axis=1)
    last = np.minimum.accumulate(np.where(end, cols, n - 1)[:, ::-1], axis=1)[:, ::-1]
    cum = np.cumsum(wn, 1)
    below = np.take_along_axis(cum - wn, first, 1)
    tied = np.take_along_axis(cum, last, 1) - below
    n_pos, n_neg = wp.sum(1), wn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (wp * (below + 0.5 * tied)).sum(1) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def classification(name: str, y: np.ndarray, proba: np.ndarray, w: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Weighted accuracy, balanced accuracy, macro F1 or ROC AUC (one-vs-rest macro over the classes
    present in each draw, probabilities renormalised over them: what the scalar metric does)."""
    y, classes = np.asarray(y), np.asarray(classes)
    proba = np.asarray(proba, np.float64)
    if proba.ndim == 2:
        proba = proba[None]
    w = np.asarray(w, np.float64)
    onehot = y[:, None] == classes[None, :]                                    # (N, C) bool
    onehot_f = onehot.astype(np.float64)
    if name == "roc_auc":
        if len(classes) == 2:
            return binary_auc(onehot[:, 1], proba[..., 1], w)
        return _multiclass_auc(y, proba, w, classes, onehot)
    pred = np.argmax(proba, axis=-1)                                           # (B', N) class positions
    hit = (classes[pred] == y[None]).astype(np.float64)
    total = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        if name == "accuracy":
            return np.where(total > 0, (w * hit).sum(1) / total, np.nan)
        if name == "balanced_accuracy":
            support = w @ onehot_f                                              # (B, C) drawn per class
            correct = (w * hit) @ onehot_f
            has = support > 0
            recall = np.where(has, correct / np.where(has, support, 1), 0.0)
            return np.where(has.any(1), recall.sum(1) / np.maximum(has.sum(1), 1), np.nan)
        if name == "macro_f1":
            f1 = []
            for c in range(len(classes)):
                is_pred = np.broadcast_to(pred == c, w.shape)
                tp = (w * is_pred * onehot[:, c]).sum(1)
                denom = (w * is_pred).sum(1) + w @ onehot_f[:, c]
                f1.append(np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0))
            return np.where(total > 0, np.mean(f1, 0), np.nan)
    raise KeyError(f"unknown classification metric {name!r}")


def _multiclass_auc(y, proba, w, classes, onehot) -> np.ndarray:
    from slice2vol.eval.metrics import _classification_metric

    b = max(len(proba), len(w))
    proba = np.broadcast_to(proba, (b,) + proba.shape[1:])
    w = np.broadcast_to(w, (b, w.shape[1]))
    present = (w @ onehot.astype(np.float64)) > 0                            # (B, C)
    out = np.full(b, np.nan)
    full = present.all(1)
    if full.any():
        sub = proba[full] / np.clip(proba[full].sum(-1, keepdims=True), 1e-12, None)
        out[full] = np.mean([binary_auc(onehot[:, c], sub[..., c], w[full]) for c in range(len(classes))], 0)
    # rare draws missing a class: the scalar metric on the expanded sample (renormalises over the rest)
    for i in np.flatnonzero(~full):
        idx = np.repeat(np.arange(len(y)), w[i].astype(np.int64))
        out[i] = _classification_metric("roc_auc", y[idx], proba[i][idx], classes)
    return out


# a spread under this fraction of the values' magnitude is rounding noise, not variation: a ridge that
# predicts the mean for everyone differs per subject only in the last bits, and Pearson r of that is a
# random +-1 (float64 sums over ~10^3 features keep ~1e-13 relative error; real spreads are >> 1e-9)
CONSTANT_RTOL = 1e-9


def near_constant(v: np.ndarray, drawn: np.ndarray | None = None) -> np.ndarray:
    """Whether each row of ``v`` is constant up to rounding, over its ``drawn`` entries.

    Args:
        v: (B, N) values (or (N,), giving a 0-d result).
        drawn: (B, N) bool, the entries that count (all when None).
    Returns:
        (B,) bool: max - min <= CONSTANT_RTOL * max |v| over the drawn entries.
    """
    v = np.asarray(v, np.float64)
    drawn = np.ones(v.shape, bool) if drawn is None else np.broadcast_to(drawn, v.shape)
    spread = np.where(drawn, v, -np.inf).max(-1) - np.where(drawn, v, np.inf).min(-1)
    scale = np.where(drawn, np.abs(v), 0.0).max(-1)
    return spread <= CONSTANT_RTOL * scale


def regression(name: str, y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted MAE, RMSE, Pearson r or R^2 (NaN where the scalar metric is NaN: no subject, a
    target or prediction constant up to rounding (:func:`near_constant`) for r, such a target for R^2)."""
    y = np.asarray(y, np.float64)[None]
    pred = np.asarray(pred, np.float64)
    if pred.ndim == 1:
        pred = pred[None]
    w = np.asarray(w, np.float64)
    total = w.sum(1)
    err = pred - y
    with np.errstate(invalid="ignore", divide="ignore"):
        if name == "mae":
            out = (w * np.abs(err)).sum(1) / total
        elif name == "rmse":
            out = np.sqrt((w * err ** 2).sum(1) / total)
        else:
            my = (w * y).sum(1, keepdims=True) / total[:, None]
            ss_tot = (w * (y - my) ** 2).sum(1)
            drawn = w > 0
            # constant up to rounding (a weighted variance would itself be rounding noise)
            y_const = near_constant(np.broadcast_to(y, w.shape), drawn)
            if name == "r2":
                out = np.where(y_const, np.nan, 1 - (w * err ** 2).sum(1) / ss_tot)
            elif name == "pearson_r":
                mp = (w * pred).sum(1, keepdims=True) / total[:, None]
                p_const = near_constant(np.broadcast_to(pred, w.shape), drawn)
                cov = (w * (y - my) * (pred - mp)).sum(1)
                out = cov / np.sqrt(ss_tot * (w * (pred - mp) ** 2).sum(1))
                out = np.where(y_const | p_const, np.nan, np.clip(out, -1.0, 1.0))
            else:
                raise KeyError(f"unknown regression metric {name!r}")
    return np.where(total > 0, out, np.nan)


def draw_weights(idx: np.ndarray, n: int) -> np.ndarray:
    """(B, N) counts from (B, N) drawn positions."""
    b = len(idx)
    return np.bincount((idx + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n).astype(np.float64)

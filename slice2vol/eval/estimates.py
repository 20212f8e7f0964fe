"""Result rows of the benchmark: pooled and fold-mean estimates, paired tests, Holm, the summary.

Two estimators of an out-of-fold score are reported for every metric:

* **pooled**: the metric of all out-of-fold predictions of a repeat at once (averaged over repeats);
* **fold mean**: the metric of each test fold on its own, averaged over folds and repeats.

For subject averages (accuracy, MAE, RMSE, ...) the two agree up to fold-size weighting. For ranking
metrics (ROC AUC) they do not: pooling ranks predictions of models fitted on different training
folds, whose intercepts differ, which biases the pooled AUC of weak, strongly regularised models
towards (and below) 0.5. The headline ``estimate`` therefore uses the fold mean for
:data:`FOLD_MEAN_METRICS` and the pooled estimate otherwise, and ``estimate_kind`` says which.
Intervals are subject-level bootstrap intervals of the same estimator.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from slice2vol.eval.metrics import (CLASSIFICATION_METRICS, LOWER_IS_BETTER, REGRESSION_METRICS, bootstrap_ci, holm,
                                    mean_sd, metric_fn, paired_test)

#: metrics whose headline estimate is the fold mean (ranking metrics; see the module docstring)
FOLD_MEAN_METRICS = frozenset({"roc_auc", "auroc"})


def primary_metric(kind: str) -> str:
    """ROC AUC for categorical labels, MAE for continuous ones."""
    return "roc_auc" if kind == "categorical" else "mae"


def headline_kind(metric: str, mode: str = "auto") -> str:
    """``pooled`` or ``fold_mean`` for ``metric`` under ``mode`` (``auto``, ``pooled``, ``fold_mean``)."""
    if mode in ("pooled", "fold_mean"):
        return mode
    if mode != "auto":
        raise ValueError(f"headline estimate must be auto, pooled or fold_mean, got {mode!r}")
    return "fold_mean" if metric in FOLD_MEAN_METRICS else "pooled"


def _f(v) -> float:
    return float(v) if v is not None else math.nan


def metric_row(*, task: str, label: str, encoder: str, variant: str, metric: str, pooled: float,
               pooled_ci: tuple[float, float], fold_values: Sequence[float] | None = None,
               fold_mean_ci: tuple[float, float] | None = None, estimate_kind: str = "pooled",
               n_subjects: int, n_folds: int, n_repeats: int) -> dict:
    """One row of ``results["rows"]`` (schema ``slice2vol.results/2``).

    Args:
        pooled, pooled_ci: the pooled estimate and its interval.
        fold_values: the metric of every test fold (all repeats); gives ``fold_mean`` / ``fold_sd``.
        fold_mean_ci: interval of the fold mean (needed when it is the headline).
        estimate_kind: which one is the headline ``estimate``.
    """
    fold_mean, fold_sd = mean_sd(fold_values) if fold_values is not None else (math.nan, math.nan)
    if estimate_kind == "fold_mean" and fold_mean_ci is None:
        raise ValueError("a fold-mean headline needs its interval")
    est, lo, hi = ((fold_mean, *fold_mean_ci) if estimate_kind == "fold_mean" else (pooled, *pooled_ci))
    return {"task": task, "label": label, "encoder": encoder, "variant": variant, "metric": metric,
            "estimate": _f(est), "estimate_kind": estimate_kind, "ci_low": _f(lo), "ci_high": _f(hi),
            "pooled": _f(pooled), "pooled_ci_low": _f(pooled_ci[0]), "pooled_ci_high": _f(pooled_ci[1]),
            "fold_mean": fold_mean, "fold_sd": fold_sd, "n_subjects": int(n_subjects), "n_folds": int(n_folds),
            "n_repeats": int(n_repeats)}


def probe_rows(task: str, label: str, encoder: str, kind: str, classes, y: np.ndarray, oof: Mapping[str, np.ndarray],
               fold_metrics: Mapping[str, Mapping[str, list]], fold_of: np.ndarray, *, n_folds: int, n_boot: int,
               seed: int, headline: str = "auto") -> list[dict]:
    """Rows of every variant and metric of one set on one label, from out-of-fold predictions.

    Args:
        oof: variant -> (R, N[, C]) out-of-fold predictions.
        fold_metrics: variant -> metric -> per-fold values.
        fold_of: (R, N) test fold of every subject (:func:`slice2vol.eval.metrics.fold_index`).
    """
    metrics = CLASSIFICATION_METRICS if kind == "categorical" else REGRESSION_METRICS
    rows = []
    for variant, preds in oof.items():
        for metric in metrics:
            fn = metric_fn(metric, kind, classes)
            point, lo, hi = bootstrap_ci(y, preds, fn, n_boot=n_boot, seed=seed)
            est_kind = headline_kind(metric, headline)
            fm_ci = None
            if est_kind == "fold_mean":
                _, flo, fhi = bootstrap_ci(y, preds, fn, n_boot=n_boot, seed=seed, fold_of=fold_of)
                fm_ci = (flo, fhi)
            rows.append(metric_row(task=task, label=label, encoder=encoder, variant=variant, metric=metric,
                                   pooled=point, pooled_ci=(lo, hi), fold_values=fold_metrics[variant][metric],
                                   fold_mean_ci=fm_ci, estimate_kind=est_kind, n_subjects=len(y), n_folds=n_folds,
                                   n_repeats=len(preds)))
    return rows


def paired_row(*, task: str, label: str, variant: str, metric: str, encoder: str, reference: str, y: np.ndarray,
               preds: np.ndarray, ref_preds: np.ndarray, classes, kind: str, fold_of: np.ndarray | None,
               n_boot: int, n_perm: int, seed: int, headline: str = "auto") -> dict:
    """Paired bootstrap interval and permutation p-value of metric(encoder) - metric(reference),
    on the headline estimator of ``metric``; ``p_holm`` is filled in by :func:`add_holm`.
    ``n_perm < 1`` (no permutation drawn) gives p = NaN: not tested."""
    est_kind = headline_kind(metric, headline)
    test = paired_test(y, preds, ref_preds, metric_fn(metric, kind, classes), n_boot=n_boot, n_perm=n_perm, seed=seed,
                       fold_of=fold_of if est_kind == "fold_mean" else None)
    if n_perm < 1:  # (0 + 1) / (0 + 1) = 1 read as "not significant" where nothing was tested
        test["p_value"] = math.nan
    return {"task": task, "label": label, "variant": variant, "metric": metric, "encoder": encoder,
            "reference": reference, "estimate_kind": est_kind, **test, "p_holm": math.nan, "n_subjects": len(y)}


def add_holm(paired: list[dict]) -> list[dict]:
    """Sets ``p_holm`` on every paired row: Holm over the comparisons of one table (task, label, variant, metric)."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(paired):
        groups.setdefault((p["task"], p["label"], str(p["variant"]), p["metric"]), []).append(i)
    for members in groups.values():
        for i, adj in zip(members, holm([paired[i]["p_value"] for i in members])):
            paired[i]["p_holm"] = adj
    return paired


def summary(rows: Sequence[Mapping], paired: Sequence[Mapping], primary: Mapping[tuple[str, str], str]) -> list[dict]:
    """One row per set x label on the primary (task, variant, metric) of each label.

    Args:
        primary: label -> (task, variant, metric) chosen as the label's headline comparison.
    """
    out = []
    for label, (task, variant, metric) in primary.items():
        for r in rows:
            if (r["label"], r["task"], str(r["variant"]), r["metric"]) != (label, task, str(variant), metric):
                continue
            test = next((p for p in paired if (p["label"], p["task"], str(p["variant"]), p["metric"], p["encoder"])
                         == (label, task, str(variant), metric, r["encoder"])), None)
            out.append({"encoder": r["encoder"], "label": label, "task": task, "variant": variant, "metric": metric,
                        "estimate": r["estimate"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                        "estimate_kind": r["estimate_kind"],
                        "delta": test["delta"] if test else None,
                        "delta_ci_low": test["ci_low"] if test else None,
                        "delta_ci_high": test["ci_high"] if test else None,
                        "p_holm": test["p_holm"] if test else None,
                        "lower_is_better": metric in LOWER_IS_BETTER})
    return out

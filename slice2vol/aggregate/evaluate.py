"""Subject-level cross-validation of an aggregator (used for the aggregation note).

Within each fold a fresh aggregator is fitted on the training subjects only; predictions for the
held-out subjects come either from its own head (supervised trainable aggregators) or from a
linear probe fitted on the training subjects' embeddings (parameter-free / label-free ones).
Probe regularisation is chosen inside the training fold. The general benchmark lives in
:mod:`slice2vol.eval`; this helper is deliberately small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from slice2vol.aggregate.base import AGGREGATORS, build_aggregator


@dataclass
class CVResult:
    """Per-fold metrics of one aggregator.

    Attributes:
        method, params, task, predictor: what was evaluated and how it predicted.
        folds: one ``metric -> value`` dict per fold.
        predictions: (N,) out-of-fold predictions (class-1 probability, or regression value).
    """

    method: str
    params: dict
    task: str
    predictor: str
    folds: list[dict[str, float]] = field(default_factory=list)
    predictions: np.ndarray | None = None

    def summary(self) -> dict[str, tuple[float, float]]:
        """metric -> (mean, sample sd over folds)."""
        keys = self.folds[0].keys()
        return {k: (float(np.mean([f[k] for f in self.folds])),
                    float(np.std([f[k] for f in self.folds], ddof=1)) if len(self.folds) > 1 else 0.0)
                for k in keys}

    def format(self) -> str:
        return ", ".join(f"{k} {m:.3f} ± {s:.3f}" for k, (m, s) in self.summary().items())


def subject_folds(y: np.ndarray, task: str, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """StratifiedKFold on the class, or on equal-count quantile bins of a continuous target.

    A continuous target gets ``min(folds, N // folds)`` bins, so each bin holds at least ``folds``
    subjects (StratifiedKFold's need): any N >= 2 * folds can be split, as ``splits.n_bins`` is
    reduced in the benchmark (:func:`slice2vol.eval.splits.make_splits`).
    """
    from sklearn.model_selection import StratifiedKFold

    if task == "classification":
        strata = np.unique(y, return_inverse=True)[1]
    else:
        n_bins = max(1, min(folds, len(y) // folds))
        ranks = np.argsort(np.argsort(y, kind="stable"), kind="stable")
        strata = ranks * n_bins // len(y)  # bin sizes differ by at most 1, each >= folds
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(skf.split(np.zeros(len(y)), strata))


INNER_FOLDS = 3
PROBE_CS = np.logspace(-4, 2, 7)


def _probe(task: str, seed: int, y_train: np.ndarray | None = None):
    """Standardise + L2 logistic regression (C by inner log-loss CV) or ridge (alpha by LOO).

    The inner CV of a classifier has ``min(3, smallest class count of y_train)`` stratified folds,
    so every inner validation part holds every class (as ``eval/linear.py`` shrinks its inner
    folds); a training fold with a class of one subject cannot be tuned and gets the grid's middle C.
    """
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if task == "classification":
        n_inner = INNER_FOLDS
        if y_train is not None:
            n_inner = min(n_inner, int(np.unique(y_train, return_counts=True)[1].min()))
        if n_inner < 2:
            return make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_CS[len(PROBE_CS) // 2], max_iter=5000))
        inner = StratifiedKFold(n_inner, shuffle=True, random_state=seed)
        logreg = GridSearchCV(LogisticRegression(max_iter=5000), {"C": PROBE_CS.tolist()},
                              cv=inner, scoring="neg_log_loss")
        return make_pipeline(StandardScaler(), logreg)
    return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 5, 15)))


def fold_metrics(task: str, y_true: np.ndarray, pred: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """classification: auc, accuracy, balanced_accuracy (pred = (n, C) probabilities);
    regression: mae, r (Pearson), r2."""
    from sklearn import metrics

    if task == "classification":
        if len(classes) == 2:
            auc = metrics.roc_auc_score(y_true == classes[1], pred[:, 1])
        else:
            auc = metrics.roc_auc_score(y_true, pred, multi_class="ovr", labels=classes)
        hard = classes[pred.argmax(1)]
        return {"auc": float(auc), "accuracy": float(metrics.accuracy_score(y_true, hard)),
                "balanced_accuracy": float(metrics.balanced_accuracy_score(y_true, hard))}
    r = float(np.corrcoef(y_true, pred)[0, 1]) if np.std(pred) > 0 else 0.0
    return {"mae": float(metrics.mean_absolute_error(y_true, pred)), "r": r,
            "r2": float(metrics.r2_score(y_true, pred))}


def cross_validate_aggregator(
    bags: Sequence[Mapping[str, Any]],
    y: Sequence,
    method: str,
    task: str = "classification",
    folds: int = 5,
    seed: int = 0,
    predictor: str = "auto",
    aggregator_seed: int | None = None,
    **params,
) -> CVResult:
    """K-fold subject-level CV of an aggregator + predictor.

    Args:
        bags: one bag per subject.
        y: (N,) target.
        method: registered aggregator name; ``params`` go to its constructor.
        task: ``classification`` or ``regression``.
        folds: number of folds (stratified; quantile bins for regression).
        seed: fold assignment, the probe's inner folds and, unless ``aggregator_seed`` is
            given, the aggregator's own seed.
        predictor: ``head`` (the aggregator's own supervised head), ``probe`` (linear probe on
            its embeddings) or ``auto`` (head for supervised trainable aggregators, else probe).
        aggregator_seed: seed of trainable aggregators (default: ``seed``).

    Returns:
        A :class:`CVResult` with per-fold metrics and out-of-fold predictions.
    """
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be classification or regression, got {task!r}")
    y = np.asarray(y)
    if len(y) != len(bags):
        raise ValueError(f"{len(bags)} bags but {len(y)} labels")
    if task == "regression":
        y = y.astype(np.float64)
    if (y.dtype.kind == "f" and not np.isfinite(y).all()) or (y.dtype.kind == "O" and any(v is None for v in y)):
        raise ValueError("y has missing values; drop those subjects first")
    classes = np.unique(y) if task == "classification" else np.array([])
    names = AGGREGATORS.get(method)._param_names()
    if "task" in names and "task" not in params:
        params = {**params, "task": task}
    if "seed" in names:
        params = {**params, "seed": seed if aggregator_seed is None else aggregator_seed}
    result = CVResult(method, dict(params), task, predictor)
    oof = np.full(len(y), np.nan)
    for train, test in subject_folds(y, task, folds, seed):
        train_bags, test_bags = [bags[i] for i in train], [bags[i] for i in test]
        agg = build_aggregator(method, **params)
        supervised = agg.requires_fit and getattr(agg, "objective", "auto") != "contrastive"
        agg.fit(train_bags, y[train] if supervised else None)
        use_head = predictor == "head" or (predictor == "auto" and supervised)
        if use_head:
            if not supervised:
                raise ValueError(f"predictor='head' needs a supervised trainable aggregator, not {method!r}")
            pred = agg.predict_proba(test_bags) if task == "classification" else agg.predict(test_bags)
            if task == "classification" and not np.array_equal(agg.classes_, classes):
                raise ValueError("a training fold misses a class; use fewer folds")
        else:
            probe = _probe(task, seed, y[train]).fit(agg.transform(train_bags), y[train])
            x_test = agg.transform(test_bags)
            pred = probe.predict_proba(x_test) if task == "classification" else probe.predict(x_test)
        result.folds.append(fold_metrics(task, y[test], pred, classes))
        oof[test] = pred[:, -1] if task == "classification" else pred
    result.predictor = predictor if predictor != "auto" else ("head" if supervised else "probe")
    result.predictions = oof
    return result

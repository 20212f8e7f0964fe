"""Linear probes: L2 logistic regression and ridge, regularisation chosen inside the training fold.

``fit(x_train, y_train, groups)`` is all a probe ever sees of a fold: the sweep over a log-spaced grid
of C (or ridge alpha) is scored by an inner stratified K-fold on those rows (grouped when ``groups`` is
given, so that a site, family or subject's other scans never sit on both sides of an inner split),
standardisation statistics are fitted on the inner-training rows of each inner fold and again on the
whole training fold for the final refit. The outer test fold cannot influence any choice. A training
fold too small for any inner split gets the middle of the grid.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class LinearConfig:
    """Attributes:
    Cs: inverse L2 strengths swept by the logistic probe.
    alphas: ridge penalties swept by the regression probe.
    inner_folds: folds of the inner validation split (on the training fold only).
    max_iter: solver iterations.
    """

    Cs: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 3, 8))
    alphas: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 5, 8))
    inner_folds: int = 3
    max_iter: int = 2000

    def __post_init__(self) -> None:
        # each was found only inside fit(), after caching: an empty grid as an IndexError, C <= 0 as
        # scikit-learn's text; inner_folds < 2 was silently run as 2, max_iter=0 fitted nothing
        for name in ("Cs", "alphas"):
            grid = getattr(self, name)
            if not isinstance(grid, (list, tuple)) or not grid or not all(_is_positive(v) for v in grid):
                shown = list(grid) if isinstance(grid, (list, tuple)) else grid
                raise ValueError(f"linear.{name} must hold at least one value, each finite and > 0, got {shown!r}")
        for name, low in (("inner_folds", 2), ("max_iter", 1)):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
                raise ValueError(f"linear.{name} must be a whole number >= {low}, got {value!r}")


def _is_positive(value: object) -> bool:
    """A finite real number > 0 (not a bool)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(float(value)) and float(value) > 0)


class _Standardizer:
    def fit(self, x: np.ndarray) -> "_Standardizer":
        self.mean_ = x.mean(0)
        self.scale_ = x.std(0)
        # "constant" is relative: random-init nets give features of order 1e-8 that still vary
        top = float(self.scale_.max()) if self.scale_.size else 0.0
        self.scale_[self.scale_ <= 1e-6 * top] = 1.0 if top == 0.0 else top
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean_) / self.scale_


def _inner_splits(y: np.ndarray, n_folds: int, classification: bool, seed: int, groups: np.ndarray | None = None):
    """(train, validation) row positions of the inner folds of one training fold; [] when none can be made.

    With ``groups`` a group is kept on one side of every inner split (StratifiedGroupKFold / GroupKFold):
    choosing the penalty on inner folds that split a subject's scans or a site is optimistic.
    """
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    from slice2vol.eval.splits import shuffled_group_codes

    if groups is not None:
        n_folds = min(n_folds, len(np.unique(groups)))
        if n_folds < 2:  # one group: every inner split would split it
            return []
    if classification:
        counts = np.unique(y, return_counts=True)[1]
        n_folds = max(2, min(n_folds, int(counts.min())))
        if counts.max() < n_folds:  # one subject per class: no split keeps a class on both sides
            return []
        with warnings.catch_warnings():
            # a class with one subject in this training fold sits in one inner part only; fit() drops the
            # parts it cannot fit and _score() covers a class unseen in training: sklearn's note is noise
            warnings.filterwarnings("ignore", "The least populated class", UserWarning)
            if groups is None:
                return list(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
            parts = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, groups)
            # with few groups a part can come out empty: nothing to score on it
            return [(tr, va) for tr, va in parts if len(tr) and len(va)]
    if len(y) < 2:  # a training fold of one subject: nothing to validate on
        return []
    n_folds = max(2, min(n_folds, len(y) // 2))
    if groups is None:
        return list(KFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(len(y))))
    return list(GroupKFold(n_folds).split(np.zeros(len(y)), groups=shuffled_group_codes(groups, seed)))


class LinearProbe:
    """Standardise -> logistic regression (classification) or ridge (regression).

    Attributes (after ``fit``):
        best_param_: the chosen C (classification) or alpha (regression).
        sweep_: param -> mean inner-validation score (log-loss negated, or negated MSE).
        scaler_: the standardiser fitted on the whole training fold.
    """

    def __init__(self, task: str = "classification", cfg: LinearConfig | None = None, seed: int = 0) -> None:
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be classification or regression, got {task!r}")
        self.task = task
        self.cfg = cfg or LinearConfig()
        self.seed = seed

    def _model(self, param: float):
        from sklearn.linear_model import LogisticRegression, Ridge

        if self.task == "classification":
            return LogisticRegression(C=param, max_iter=self.cfg.max_iter)
        return Ridge(alpha=param)

    def _score(self, model, x: np.ndarray, y: np.ndarray) -> float:
        if self.task == "classification":
            proba = model.predict_proba(x)
            column = {c: i for i, c in enumerate(model.classes_)}
            # a validation class absent from inner-training gets probability ~0
            p = np.array([proba[i, column[v]] if v in column else 1e-12 for i, v in enumerate(y)])
            return float(np.mean(np.log(np.clip(p, 1e-12, 1))))  # mean log-likelihood
        return float(-np.mean((model.predict(x) - y) ** 2))

    def fit(self, x: np.ndarray, y: np.ndarray, groups: Sequence | None = None) -> "LinearProbe":
        """Sweeps the penalty on inner folds of (x, y), then refits on all of it.

        Args:
            x: (N, D) training features of one outer fold.
            y: (N,) training targets.
            groups: (N,) group of each training row (``splits.group``: site, family, subject of
                longitudinal rows); inner folds then never split a group. None: ungrouped inner folds.
        """
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y)
        if groups is not None:
            groups = np.asarray([str(v) for v in groups])
            if len(groups) != len(y):
                raise ValueError(f"LinearProbe.fit: {len(groups)} groups for {len(y)} training rows")
        if self.task == "regression":
            y = y.astype(np.float64)
        classification = self.task == "classification"
        grid: Sequence[float] = self.cfg.Cs if classification else self.cfg.alphas
        # ties go to the stronger penalty (smaller C / larger alpha)
        ordered = sorted(grid) if classification else sorted(grid, reverse=True)
        # a training fold of one class (a class with a single subject sits in the test fold): no logistic
        # regression can be fitted; the probe predicts that class, as a model of the class prior would
        one_class = classification and len(np.unique(y)) < 2
        inner = [] if one_class else _inner_splits(y, self.cfg.inner_folds, classification, self.seed, groups)
        if classification:
            # with few subjects an inner-training part can hold one class only: it cannot be fitted
            inner = [(tr, va) for tr, va in inner if len(np.unique(y[tr])) > 1]
        self.sweep_: dict[float, float] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter at extreme C is expected
            for param in grid if inner else []:
                scores = []
                for tr, va in inner:
                    scaler = _Standardizer().fit(x[tr])
                    model = self._model(param).fit(scaler.transform(x[tr]), y[tr])
                    scores.append(self._score(model, scaler.transform(x[va]), y[va]))
                self.sweep_[float(param)] = float(np.mean(scores))
            # no inner split could be fitted (too few subjects, classes or groups to tune): the grid's middle value
            self.best_param_ = (max(ordered, key=lambda p: self.sweep_[float(p)]) if self.sweep_
                                else ordered[len(ordered) // 2])
            self.scaler_ = _Standardizer().fit(x)
            if one_class:
                from sklearn.dummy import DummyClassifier

                self.model_ = DummyClassifier(strategy="prior").fit(x, y)
            else:
                self.model_ = self._model(self.best_param_).fit(self.scaler_.transform(x), y)
        if classification:
            self.classes_ = self.model_.classes_
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(M, D) -> (M, C) class probabilities in the order of ``classes_``."""
        return self.model_.predict_proba(self.scaler_.transform(np.asarray(x, dtype=np.float64)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(M, D) -> (M,) class labels or continuous predictions."""
        return self.model_.predict(self.scaler_.transform(np.asarray(x, dtype=np.float64)))

"""The task interface of the benchmark.

A task gets a :class:`TaskContext` (config, cohort, labels, the shared subject-level splits of every
label, the embedding sets, the result cache) and returns a :class:`TaskResult` whose ``rows``,
``paired`` and ``figures`` have the shapes of ``results`` (schema ``slice2vol.results/2``; see
:func:`slice2vol.eval.estimates.metric_row`). The runner merges them, applies Holm per table and
writes the report. Two kinds:

* :class:`Task`: anything (a dense probe re-embedding volumes, anomaly detection, a learning curve):
  implement ``run(ctx)``; fit only on the training subjects of ``ctx`` splits, score test subjects.
* :class:`ProbeTask`: a probe on volume embeddings. Implement ``fit_predict`` (fit on one training
  fold, predict its test fold), ``options`` and ``primary_variant``; the shared loop does the rest:
  every set x label x fold, out-of-fold predictions, pooled and fold-mean estimates with bootstrap
  intervals, paired tests against the reference, chance rows, caching.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np

from slice2vol.eval.estimates import paired_row, primary_metric, probe_rows
from slice2vol.eval.metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS, fold_index, metric_fn
from slice2vol.eval.resultcache import ResultCache, content_key

log = logging.getLogger(__name__)


@dataclass
class TaskContext:
    """Everything a task may read. Tasks never write outside ``out`` and the cache.

    Attributes:
        cfg: the resolved :class:`~slice2vol.eval.experiment.ExperimentConfig`.
        base: folder relative config paths are taken from (the repository).
        out: the run folder; figures go to ``out / "figures"``.
        cohort, manifest: the loaded cohort and its manifest path.
        labels, label_types: DataFrame indexed by subject ID; label -> categorical/continuous.
        frames: label -> :class:`~slice2vol.eval.cohort.LabelSplits` (the shared splits of every label).
        sets: name -> :class:`~slice2vol.eval.sets.EmbeddingSet` (volume embeddings, baselines, chance).
        reference: the set every other set is compared with (None: no paired tests).
        models3d: 3D entry name -> encoder module (None when only its embeddings exist).
        cache: the result cache (JSON + npz, content keys).
        progress: show progress.
        timings: stage -> seconds (tasks add their own entries).
    """

    cfg: Any
    base: Path
    out: Path
    cohort: Any = None
    manifest: Path | None = None
    labels: Any = None
    label_types: Mapping[str, str] = field(default_factory=dict)
    frames: Mapping[str, Any] = field(default_factory=dict)
    sets: Mapping[str, Any] = field(default_factory=dict)
    reference: str | None = None
    models3d: Mapping[str, Any] = field(default_factory=dict)
    cache: ResultCache | None = None
    progress: bool = True
    timings: dict = field(default_factory=dict)

    @property
    def fig_dir(self) -> Path:
        path = self.out / "figures"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def params(self, task: str) -> dict:
        """The YAML block of a task that has no field of its own in the experiment config."""
        return dict(self.cfg.task_params.get(task) or {})

    def figure(self, section: str, caption: str, png: str | Path, svg: str | Path | None = None) -> dict:
        """A ``figures`` entry with paths relative to ``out``."""
        rel = lambda p: os.path.relpath(p, self.out) if p is not None else None  # noqa: E731
        return {"section": section, "caption": caption, "png": rel(png), "svg": rel(svg)}


@dataclass
class TaskResult:
    """What a task returns (see the module docstring for the row shapes).

    Attributes:
        rows, paired, figures: lists of dicts in the shapes of ``results``.
        extras: task-specific JSON-able results (``results["tasks"][name]``).
        skipped: ``{name, reason, substitute}`` for every set or entry the task could not score.
    """

    rows: list = field(default_factory=list)
    paired: list = field(default_factory=list)
    figures: list = field(default_factory=list)
    extras: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)

    @classmethod
    def from_dict(cls, out: Mapping[str, Any]) -> "TaskResult":
        """From a dict with these five keys (what the dense tasks' ``run_*`` functions return)."""
        return cls(rows=out["rows"], paired=out["paired"], figures=out["figures"], extras=out["extras"],
                   skipped=out["skipped"])


class Task:
    """Base of every task: set ``name`` and implement :meth:`run`."""

    name: ClassVar[str] = ""

    def run(self, ctx: TaskContext) -> TaskResult:
        raise NotImplementedError


def align_proba(proba: np.ndarray, fitted_classes: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(M, C') probabilities over the classes a model saw -> (M, C) over all classes (absent ones 0)."""
    out = np.zeros((len(proba), len(classes)))
    out[:, np.searchsorted(classes, fitted_classes)] = proba
    return out


def chance_predict(frame, y_train: np.ndarray, n_test: int, seed: int) -> np.ndarray:
    """The stratified dummy (class drawn with training frequencies) or the training mean."""
    from sklearn.dummy import DummyClassifier, DummyRegressor

    x_train, x_test = np.zeros((len(y_train), 1)), np.zeros((n_test, 1))
    if frame.kind == "categorical":
        dummy = DummyClassifier(strategy="stratified", random_state=seed).fit(x_train, y_train)
        return align_proba(dummy.predict_proba(x_test), dummy.classes_, frame.classes)
    return DummyRegressor(strategy="mean").fit(x_train, y_train).predict(x_test)


class ProbeTask(Task):
    """A probe fitted per training fold on volume embeddings (see the module docstring)."""

    def options(self, ctx: TaskContext) -> dict:
        """JSON-able settings that change this task's numbers (part of every cache key)."""
        raise NotImplementedError

    def primary_variant(self, ctx: TaskContext, kind: str) -> str:
        """The variant paired tests and the summary use, for a ``categorical``/``continuous`` label."""
        raise NotImplementedError

    def fit_predict(self, ctx: TaskContext, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, frame,
                    fold) -> tuple[dict[str, np.ndarray], dict]:
        """Fits on one training fold, predicts its test fold.

        Args:
            x_train: (n, D) training rows; y_train: (n,) their targets.
            x_test: (m, D) test rows.
            frame: the label's :class:`~slice2vol.eval.cohort.LabelSplits` (kind, classes).
            fold: the :class:`~slice2vol.eval.splits.Fold` (``repeat`` seeds stochastic probes).

        Returns:
            (variant -> (m,) predictions or (m, C) probabilities in ``frame.classes`` order, info dict).
        """
        raise NotImplementedError

    def skip_reason(self, ctx: TaskContext, es) -> str | None:
        """Why this task cannot score set ``es`` (None: it can)."""
        return None

    # -- the shared loop -------------------------------------------------------------------------
    def evaluate_set(self, ctx: TaskContext, es, frame) -> dict:
        """Out-of-fold predictions (R, N[, C]) and per-fold metrics of every variant on one set."""
        splits, y, kind = frame.splits, frame.y, frame.kind
        metrics = CLASSIFICATION_METRICS if kind == "categorical" else REGRESSION_METRICS
        shape = (splits.n_repeats, len(y)) + ((len(frame.classes),) if kind == "categorical" else ())
        oof: dict[str, np.ndarray] = {}
        fold_metrics: dict[str, dict[str, list]] = {}
        infos: list[dict] = []
        for fold in splits.folds:
            tr, te = splits.positions(frame.ids, fold)
            if es.kind == "chance":
                preds = {self.primary_variant(ctx, kind): chance_predict(frame, y[tr], len(te),
                                                                       ctx.cfg.seed + 1000 * fold.repeat + fold.fold)}
                info = {}
            else:
                x_train, x_test = es.fold_features(frame, fold)
                preds, info = self.fit_predict(ctx, x_train, y[tr], x_test, frame, fold)
            infos.append(info)
            for variant, pred in preds.items():
                arr = oof.setdefault(variant, np.full(shape, np.nan))
                arr[fold.repeat, te] = pred
                store = fold_metrics.setdefault(variant, {m: [] for m in metrics})
                for m in metrics:
                    store[m].append(metric_fn(m, kind, frame.classes)(y[te], pred))
        return {"oof": oof, "fold_metrics": fold_metrics, "info": infos}

    def run(self, ctx: TaskContext) -> TaskResult:
        cfg, cache = ctx.cfg, ctx.cache
        result = TaskResult()
        headline = getattr(cfg, "headline_estimate", "auto")
        for label, frame in ctx.frames.items():
            kind = frame.kind
            fold_of = fold_index(len(frame.ids), [(f.repeat, frame.splits.positions(frame.ids, f)[1])
                                                  for f in frame.splits.folds])
            base_key = [self.name, self.options(ctx), frame.y.tolist(), frame.splits.to_dict(), cfg.seed]
            evaluated: dict[str, dict] = {}
            keys: dict[str, str] = {}
            for name, es in ctx.sets.items():
                reason = self.skip_reason(ctx, es)
                if reason:
                    result.skipped.append({"name": f"{self.name}: {name} ({label})", "reason": reason,
                                           "substitute": None})
                    continue
                key = content_key("probe", *base_key, es.identity(frame))
                ev = cache.get("probe", key) if cache else None
                if ev is None:
                    t0 = time.time()
                    ev = self.evaluate_set(ctx, es, frame)
                    log.info("%s / %s / %s: %.1f s", self.name, label, name, time.time() - t0)
                    if cache:
                        cache.put("probe", key, ev)
                evaluated[name], keys[name] = ev, key
                stats_key = content_key("rows", key, label, name, cfg.n_bootstrap, headline)
                rows = cache.get("rows", stats_key) if cache else None
                if rows is None:
                    rows = probe_rows(self.name, label, name, kind, frame.classes, frame.y, ev["oof"],
                                      ev["fold_metrics"], fold_of, n_folds=cfg.splits.n_folds,
                                      n_boot=cfg.n_bootstrap, seed=cfg.seed, headline=headline)
                    if cache:
                        cache.put("rows", stats_key, rows)
                result.rows += rows
                if ev["info"] and any(ev["info"]):
                    result.extras.setdefault(label, {})[name] = ev["info"]
            result.paired += self._paired(ctx, frame, evaluated, keys, fold_of, headline)
        return result

    def _paired(self, ctx: TaskContext, frame, evaluated: dict, keys: dict, fold_of: np.ndarray,
                headline: str) -> list[dict]:
        cfg, cache, ref = ctx.cfg, ctx.cache, ctx.reference
        variant = self.primary_variant(ctx, frame.kind)
        if ref not in evaluated or variant not in evaluated[ref]["oof"]:
            return []
        metric = primary_metric(frame.kind)
        out = []
        for name, ev in evaluated.items():
            if name == ref or variant not in ev["oof"]:
                continue
            key = content_key("paired", keys[name], keys[ref], variant, metric, cfg.n_bootstrap, cfg.n_permutations,
                              headline)
            row = cache.get("paired", key) if cache else None
            if row is None:
                row = paired_row(task=self.name, label=frame.label, variant=variant, metric=metric, encoder=name,
                                 reference=ref, y=frame.y, preds=ev["oof"][variant],
                                 ref_preds=evaluated[ref]["oof"][variant], classes=frame.classes, kind=frame.kind,
                                 fold_of=fold_of, n_boot=cfg.n_bootstrap, n_perm=cfg.n_permutations, seed=cfg.seed,
                                 headline=headline)
                if cache:
                    cache.put("paired", key, row)
            out.append(row)
        return out

"""The public Python API: cohort -> encoder -> feature store -> volume embeddings -> probes with CIs.

Every name here is also importable from the package root (``import slice2vol as s2v``), loaded on
first use so that ``import slice2vol`` stays fast. The functions are thin, documented entry points
onto the package's own pieces (:mod:`slice2vol.data`, :mod:`slice2vol.encoders`,
:mod:`slice2vol.extract`, :mod:`slice2vol.aggregate`) plus :func:`evaluate`, which runs the
benchmark's k-NN and linear probes on subject-level cross-validation without any config file.

Example (the README's, run by ``tests/test_api.py``):
    >>> import slice2vol as s2v
    >>> cohort = s2v.load_cohort("runs/cohort/manifest.csv")
    >>> encoder = s2v.build_encoder("tv/mobilenet_v2", weights="random", img_size=64)
    >>> s2v.cache_cohort(cohort, encoder, "runs/api/mnv2.h5", size=64, stride=2)
    >>> name = s2v.aggregate("runs/api/mnv2.h5", "mean")
    >>> ids, X, provenance = s2v.FeatureStore("runs/api/mnv2.h5").volume_embeddings(name)
    >>> table = s2v.evaluate(X, cohort.labels().loc[ids, "lesion"], n_folds=4)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from slice2vol.data import Cohort
    from slice2vol.extract import CacheReport

log = logging.getLogger(__name__)

__all__ = ["load_cohort", "build_encoder", "cache_cohort", "FeatureStore", "aggregate", "evaluate"]


def load_cohort(source: str | Path, **kwargs: Any) -> "Cohort":
    """A cohort from a CSV manifest, a folder holding ``manifest.csv`` / ``participants.csv``, or a
    BIDS folder.

    Args:
        source: the manifest file, or a folder. A folder with ``manifest.csv`` (what ``slice2vol
            synth`` writes) or ``participants.csv`` (the IXI layout) loads that file; any other
            folder is read as BIDS (:func:`slice2vol.data.cohort_from_glob`).
        **kwargs: passed on to :func:`slice2vol.data.load_manifest` (``label_types``,
            ``label_columns``, ...) or :func:`slice2vol.data.cohort_from_glob` (``pattern``, ...).

    Returns:
        A :class:`slice2vol.data.Cohort`: ``.subjects``, ``.labels()`` (DataFrame indexed by subject
        ID), ``.label_types``, ``.failures`` (rows that could not be used, with the reason).
    """
    from slice2vol.data import cohort_from_glob, load_manifest

    path = Path(source)
    if path.is_dir():
        for name in ("manifest.csv", "participants.csv"):
            if (path / name).is_file():
                return load_manifest(path / name, **kwargs)
        return cohort_from_glob(path, **kwargs)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such manifest or folder")
    return load_manifest(path, **kwargs)


def build_encoder(key: str, weights: str | Path | None = "random", *, seed: int = 0, **kwargs: Any):
    """A registered 2D encoder in eval mode (see ``slice2vol encoders`` for the keys).

    Args:
        key: registry key, e.g. ``tv/mobilenet_v2``, ``timm/resnet18``.
        weights: ``random``, ``hub[:tag]`` or a local file; see docs/encoders.md for the whole
            resolution order.
        seed: torch seed of ``random`` weights, so a rerun builds the same network (and resumes the
            same feature store) without touching the global random state.
        **kwargs: family options such as ``img_size``.

    Returns:
        A :class:`slice2vol.encoders.Encoder`: ``encoder(x)`` maps preprocessed (B, C, H, W) slices to
        (B, D) features; ``encoder.info`` holds its preprocessing and weights provenance.
    """
    import torch

    from slice2vol.encoders import build_encoder as _build

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(key, weights=weights, **kwargs)


def cache_cohort(cohort: "Cohort | str | Path", encoder: Any, store: str | Path, *, planes: Sequence[str] | None = None,
                 size: int | None = None, stride: int | None = None, **kwargs: Any) -> "CacheReport":
    """Embeds every slice of every subject into an HDF5 feature store (resumable; cached subjects are
    skipped).

    Args:
        cohort: a Cohort, or anything :func:`load_cohort` reads.
        encoder: a built encoder (:func:`build_encoder`) or a registry key (then ``weights=`` applies).
        store: the ``.h5`` store file (created).
        planes, size, stride: shortcuts for the matching :class:`slice2vol.data.SliceConfig` fields
            (planes to cut, square side in pixels, keep every n-th slice).
        **kwargs: the options of :func:`slice2vol.extract.cache_cohort` (``weights``, ``slice_cfg``,
            ``volume_cfg``, ``batch_size``, ``device``, ``dtype``, ``progress``, ...).

    Returns:
        A :class:`slice2vol.extract.CacheReport` (``.ok``, ``.failures``, counts and timings).
    """
    from slice2vol.data import SliceConfig
    from slice2vol.extract import cache_cohort as _cache

    if not hasattr(cohort, "subjects"):
        cohort = load_cohort(cohort)
    shortcuts = {k: v for k, v in {"planes": tuple(planes) if planes is not None else None, "size": size,
                                   "stride": stride}.items() if v is not None}
    if shortcuts:
        kwargs["slice_cfg"] = dataclasses.replace(kwargs.get("slice_cfg") or SliceConfig(), **shortcuts)
    kwargs.setdefault("progress", False)
    return _cache(cohort, encoder, store, **kwargs)


def aggregate(store: str | Path, method: str = "mean", **kwargs: Any) -> str:
    """Aggregates each subject's slice features into one volume vector, written back into the store.

    Args:
        store: the feature store.
        method: ``mean``, ``max``, ``gem``, ``mil``, ``transformer``, ``fusion``, ``head3d``
            (see docs/aggregation.md); trainable ones need ``train_ids=``.
        **kwargs: the options of :func:`slice2vol.aggregate.aggregate_store` (``planes``, ``name``,
            ``train_ids``, ``label``, ``plot``, aggregator parameters).

    Returns:
        The name of the written set: read it with ``FeatureStore(store).volume_embeddings(name)``.
    """
    from slice2vol.aggregate import aggregate_store

    kwargs.setdefault("plot", False)
    return aggregate_store(store, method, **kwargs)


def __getattr__(name: str):
    # FeatureStore is the store class itself; loaded on first use (h5py import)
    if name == "FeatureStore":
        from slice2vol.cache import FeatureStore

        return FeatureStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- evaluate ------------------------------------------------------------------------------------
_PRIMARY = {"categorical": "roc_auc", "continuous": "mae"}


def _as_sets(X: Any) -> dict[str, np.ndarray]:
    if isinstance(X, Mapping):
        sets = {str(k): np.asarray(v, dtype=np.float32) for k, v in X.items()}
    else:
        sets = {"X": np.asarray(X, dtype=np.float32)}
    if not sets:
        raise ValueError("evaluate: X is an empty mapping")
    for name, x in sets.items():
        if x.ndim != 2:
            raise ValueError(f"evaluate: X[{name!r}] must be (N, D) (one row per subject), got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"evaluate: X[{name!r}] holds NaN or inf")
    rows = {x.shape[0] for x in sets.values()}
    if len(rows) != 1:
        raise ValueError(f"evaluate: every set needs the same rows (subjects), got {sorted(rows)}")
    return sets


def _infer_kind(y: "pd.Series") -> str:
    from slice2vol.data.manifest import infer_label_type

    return infer_label_type(y)


def evaluate(X: Any, y: Any, *, ids: Sequence[str] | None = None, kind: str | None = None,
             groups: Sequence | None = None, probes: Sequence[str] = ("knn", "linear"), ks: Sequence[int] = (10,),
             temperature: float = 0.07, n_folds: int = 5, n_repeats: int = 1, seed: int = 0,
             n_bootstrap: int = 1000, n_permutations: int = 1000, reference: str | None = None,
             linear: Any = None, level: float = 0.95) -> "pd.DataFrame":
    """k-NN and linear probes of volume embeddings on subject-level cross-validation, with CIs.

    The same protocol as ``slice2vol bench``, without a config file: repeated stratified K-fold over
    subjects (:func:`slice2vol.eval.splits.make_splits`, one row = one subject; a repeated ID is
    refused), the k-NN probe (cosine, temperature-weighted and majority votes) and the linear probe
    (L2 logistic or ridge, penalty chosen on inner folds of each training fold, standardised inside
    it). Out-of-fold predictions are pooled over all subjects (averaged over repeats) and given a
    subject-level bootstrap CI; the per-fold mean and sd are reported beside it.

    Args:
        X: (N, D) volume embeddings, or a mapping name -> (N, D) to compare several sets on the same
            subjects and splits (then ``delta`` columns compare each set with ``reference``).
        y: (N,) target; a pandas Series also gives the subject IDs (its index). Rows whose target
            is missing are dropped.
        ids: (N,) unique subject IDs (default: the Series index, else row numbers).
        kind: ``categorical`` or ``continuous`` (default: inferred like manifest labels).
        groups: (N,) values kept together in one fold (site, family, ...).
        probes: any of ``knn``, ``linear``.
        ks: neighbours of the k-NN probe (the first one is primary).
        temperature: k-NN softmax temperature.
        n_folds, n_repeats, seed: the subject-level splits.
        n_bootstrap: bootstrap draws of the CIs.
        n_permutations: permutations of the paired test (mapping input only).
        reference: the set the others are compared with (default: the first).
        linear: a :class:`slice2vol.eval.linear.LinearConfig` (penalty grids, inner folds).
        level: CI level.

    Returns:
        A DataFrame, one row per (set, probe, variant, metric): ``encoder, probe, variant, metric,
        estimate, ci_low, ci_high, fold_mean, fold_sd, n_subjects, n_folds, n_repeats, primary``
        (the primary metric is ROC AUC for categorical targets, MAE for continuous ones); with
        several sets also ``reference, delta, delta_ci_low, delta_ci_high, p_value`` on the primary
        rows (paired bootstrap CI and paired permutation test on the same subjects and splits).
        ``table.attrs`` holds ``kind``, ``classes`` and the subject IDs of each fold.
    """
    import pandas as pd

    from slice2vol.config import check_whole
    from slice2vol.eval.knn import KNNProbe, _check_ks
    from slice2vol.eval.linear import LinearConfig, LinearProbe
    from slice2vol.eval.metrics import (CLASSIFICATION_METRICS, REGRESSION_METRICS, bootstrap_ci, check_level,
                                        mean_sd, metric_fn, paired_test)
    from slice2vol.eval.splits import SplitConfig, make_splits

    check_level(level)  # before the cross-validation, not after it
    # 0 permutations gave p = 1.0 (read as "not significant", not "not tested")
    check_whole("evaluate: n_bootstrap", n_bootstrap, 1)
    check_whole("evaluate: n_permutations", n_permutations, 1)
    sets = _as_sets(X)
    n = next(iter(sets.values())).shape[0]
    if isinstance(probes, str):  # "knn" or "knn,linear", not three one-letter probes
        probes = [p.strip() for p in probes.split(",") if p.strip()]
    unknown = [p for p in probes if p not in ("knn", "linear")]
    if unknown or not probes:
        raise ValueError(f"evaluate: probes must be among ['knn', 'linear'], got {list(probes)}")
    target = y if isinstance(y, pd.Series) else pd.Series(np.asarray(y, dtype=object))
    if len(target) != n:
        raise ValueError(f"evaluate: y has {len(target)} values for {n} rows of X")
    if ids is None:
        ids = [str(i) for i in target.index] if isinstance(y, pd.Series) else [str(i) for i in range(n)]
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"evaluate: {len(ids)} ids for {n} rows of X")
    target = pd.Series(target.to_numpy(), index=ids)
    keep = target.notna().to_numpy()
    if not keep.all():
        log.info("evaluate: %d subjects without a target dropped", int((~keep).sum()))
    kind = kind or _infer_kind(target[keep])
    if kind not in ("categorical", "continuous"):
        raise ValueError(f"evaluate: kind must be categorical or continuous, got {kind!r}")
    kept_ids = [i for i, k in zip(ids, keep) if k]
    yk = target[keep].to_numpy()
    yk = yk.astype(np.float64) if kind == "continuous" else yk.astype(str)
    classes = np.unique(yk) if kind == "categorical" else None
    if classes is not None and len(classes) < 2:
        raise ValueError(f"evaluate: the target has one class ({classes[0]!r}); nothing to predict")
    group_values = None if groups is None else [g for g, k in zip(groups, keep) if k]
    splits = make_splits(kept_ids, yk, kind, groups=group_values,
                         cfg=SplitConfig(n_folds=n_folds, n_repeats=n_repeats, seed=seed))
    # as the bench does: a k above the smallest training fold is clipped to it in every fold (clipping
    # per fold would mix k=37 and k=38 in one row) and the row is named by the k actually used
    smallest = min(len(f.train) for f in splits.folds)
    ks = _check_ks(ks, temperature, "evaluate: ")
    used_ks = list(dict.fromkeys(min(k, smallest) for k in ks))
    if any(int(k) > smallest for k in ks):
        log.warning("evaluate: k above the smallest training fold (%d subjects) clipped to it: %s", smallest,
                    ", ".join(f"k={int(k)} -> k={min(int(k), smallest)}" for k in ks if int(k) > smallest))
    order = {s: i for i, s in enumerate(kept_ids)}
    rows_of = np.array([order[s] for s in splits.subject_ids])
    position = {s: i for i, s in enumerate(splits.subject_ids)}
    yk = yk[rows_of]
    row_index = np.flatnonzero(keep)[rows_of]
    task = "classification" if kind == "categorical" else "regression"
    metrics = CLASSIFICATION_METRICS if kind == "categorical" else REGRESSION_METRICS
    primary = _PRIMARY[kind]
    linear_cfg = linear or LinearConfig()
    r_count = splits.n_repeats
    shape = (r_count, len(yk), len(classes)) if kind == "categorical" else (r_count, len(yk))

    def full_proba(p: np.ndarray, probe_classes: np.ndarray) -> np.ndarray:
        out = np.zeros((len(p), len(classes)))
        out[:, np.searchsorted(classes, probe_classes)] = p
        return out

    oof: dict[str, dict[tuple[str, str], np.ndarray]] = {}
    per_fold: dict[str, dict[tuple[str, str], dict[str, list[float]]]] = {}
    for name, x_all in sets.items():
        x = x_all[row_index]
        oof[name], per_fold[name] = {}, {}

        def record(variant: tuple[str, str], r: int, te: np.ndarray, pred: np.ndarray) -> None:
            arr = oof[name].setdefault(variant, np.full(shape, np.nan))
            arr[r, te] = pred
            store = per_fold[name].setdefault(variant, {m: [] for m in metrics})
            for m in metrics:
                store[m].append(metric_fn(m, kind, classes)(yk[te], pred))

        for fold in splits.folds:
            tr = np.array([position[s] for s in fold.train])
            te = np.array([position[s] for s in fold.test])
            if "knn" in probes:
                knn = KNNProbe(used_ks, temperature, task).fit(x[tr], yk[tr])
                for (k, vote), pred in knn.predict(x[te]).items():
                    if kind == "categorical":
                        pred = full_proba(pred, knn.classes_)
                    record(("knn", f"k={k} {vote}"), fold.repeat, te, pred)
            if "linear" in probes:
                inner = None if group_values is None else np.asarray(group_values, dtype=str)[tr]
                lin = LinearProbe(task, linear_cfg, seed=seed + fold.repeat).fit(x[tr], yk[tr], groups=inner)
                if kind == "categorical":
                    record(("linear", "logistic"), fold.repeat, te, full_proba(lin.predict_proba(x[te]), lin.classes_))
                else:
                    record(("linear", "ridge"), fold.repeat, te, lin.predict(x[te]))

    names = list(sets)
    reference = reference if reference is not None else names[0]
    if reference not in sets:
        raise ValueError(f"evaluate: reference {reference!r} is not one of {names}")
    primary_variants = set()
    if "knn" in probes:
        primary_variants.add(("knn", f"k={used_ks[0]} weighted"))
    if "linear" in probes:
        primary_variants.add(("linear", "logistic" if kind == "categorical" else "ridge"))
    records = []
    for name in names:
        for variant, preds in oof[name].items():
            for m in metrics:
                fn = metric_fn(m, kind, classes)
                est, lo, hi = bootstrap_ci(yk, preds, fn, n_boot=n_bootstrap, seed=seed, level=level)
                fold_mean, fold_sd = mean_sd(per_fold[name][variant][m])
                row = {"encoder": name, "probe": variant[0], "variant": variant[1], "metric": m, "estimate": est,
                       "ci_low": lo, "ci_high": hi, "fold_mean": fold_mean, "fold_sd": fold_sd,
                       "n_subjects": len(yk), "n_folds": n_folds, "n_repeats": r_count,
                       "primary": m == primary and variant in primary_variants}
                if len(names) > 1:
                    row.update({"reference": reference, "delta": math.nan, "delta_ci_low": math.nan,
                                "delta_ci_high": math.nan, "p_value": math.nan})
                    if row["primary"] and name != reference:
                        test = paired_test(yk, preds, oof[reference][variant], fn, n_boot=n_bootstrap,
                                           n_perm=n_permutations, seed=seed, level=level)
                        row.update({"delta": test["delta"], "delta_ci_low": test["ci_low"],
                                    "delta_ci_high": test["ci_high"], "p_value": test["p_value"]})
                    elif row["primary"]:
                        row.update({"delta": 0.0})
                records.append(row)
    table = pd.DataFrame.from_records(records)
    table.attrs.update({"kind": kind, "classes": None if classes is None else classes.tolist(),
                        "folds": [{"repeat": f.repeat, "fold": f.fold, "test": list(f.test)} for f in splits.folds]})
    return table

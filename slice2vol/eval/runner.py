"""The experiment runner: one YAML file -> stores, embeddings, every task, figures and a report.

Stages, each skipped when its output already exists with the same settings:

1. cohort: a manifest, or the synthetic cohort built once into ``<out>/cohort``;
2. per 2D encoder entry: slice features cached into ``<stores>/<name>-<hash>.h5``
   (:func:`slice2vol.extract.cache_cohort` skips cached subjects), then every listed aggregator
   (:func:`slice2vol.aggregate.aggregate_store`);
3. per 3D baseline: load a checkpoint or pretrain at the configured (smoke) scale, then
   :func:`slice2vol.ssl.export.embed_cohort` into its own store;
4. evaluation on every volume-embedding set with the SAME subject-level splits (saved in
   ``<out>/splits/<label>.json``): k-NN and linear probes per label, paired tests against the
   reference, dense segmentation probe and anomaly detection for encoders that can run on volumes;
5. figures (UMAP / t-SNE, bars with intervals, overlays) and the report (:mod:`slice2vol.eval.report`).

Evaluation results are cached in ``<out>/cache`` by a hash of their inputs, so a rerun with
everything in place only re-renders the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from slice2vol.config import config_hash, from_dict, load_config, to_dict
from slice2vol.data.io import VolumeConfig
from slice2vol.data.slicing import SliceConfig
from slice2vol.eval.anomaly import AnomalyConfig
from slice2vol.eval.knn import KNNConfig, KNNProbe
from slice2vol.eval.linear import LinearConfig, LinearProbe
from slice2vol.eval.metrics import (CLASSIFICATION_METRICS, LOWER_IS_BETTER, REGRESSION_METRICS, bootstrap_ci,
                                    mean_sd, metric_fn, paired_test)
from slice2vol.eval.segmentation import SegConfig
from slice2vol.eval.splits import SplitConfig, SubjectSplits, load_or_make_splits, make_splits

log = logging.getLogger(__name__)


class IntegrationError(RuntimeError):
    """A pipeline stage whose library piece is missing or has another interface than expected."""


# -- config -------------------------------------------------------------------------------------
@dataclass
class CohortSection:
    """Attributes:
    manifest: CSV manifest (``${VAR:-default}`` expanded; relative to the repository root).
    synthetic: build the synthetic cohort with these ``make_cohort`` keywords instead (into ``<out>/cohort``).
    labels: label columns to evaluate (default: every label column).
    label_types: overrides of the inferred ``categorical``/``continuous`` types.
    max_subjects: use only the first N subjects.
    """

    manifest: str | None = None
    synthetic: dict | None = None
    labels: list[str] | None = None
    label_types: dict = field(default_factory=dict)
    max_subjects: int | None = None


@dataclass
class Encoder2DEntry:
    """A 2D encoder applied slice-wise. ``name`` labels it in tables; ``aggregators`` are
    ``slice2vol.aggregate`` methods, each giving one volume-embedding set ``<name>/<aggregator>``."""

    name: str
    key: str
    weights: str = "random"
    kwargs: dict = field(default_factory=dict)
    aggregators: list[str] = field(default_factory=lambda: ["mean"])
    aggregator_params: dict = field(default_factory=dict)
    batch_size: int = 32
    save_tokens: bool = False
    dtype: str = "float16"
    # optional: skip (with a warning) when the weights file is absent, so a config that uses
    # machine-specific weights still runs on a fresh machine
    optional: bool = False


@dataclass
class Encoder3DEntry:
    """A native-3D baseline: a checkpoint, or an SSL pretraining run (``ssl``: SSLConfig fields)."""

    name: str
    checkpoint: str | None = None
    ssl: dict = field(default_factory=dict)
    input_size: tuple[int, int, int] = (64, 64, 64)


@dataclass
class ExperimentConfig:
    """A whole comparison (``configs/experiments/*.yaml``)."""

    name: str = "experiment"
    cohort: CohortSection = field(default_factory=CohortSection)
    volume: VolumeConfig = field(default_factory=VolumeConfig)
    slices: SliceConfig = field(default_factory=SliceConfig)
    encoders: list[Encoder2DEntry] = field(default_factory=list)
    encoders3d: list[Encoder3DEntry] = field(default_factory=list)
    tasks: list[str] = field(default_factory=lambda: ["knn", "linear", "segmentation", "anomaly"])
    splits: SplitConfig = field(default_factory=SplitConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    primary_k: int = 10
    linear: LinearConfig = field(default_factory=LinearConfig)
    segmentation: SegConfig = field(default_factory=SegConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    reference: str | None = None
    n_bootstrap: int = 1000
    n_permutations: int = 1000
    plots: list[str] = field(default_factory=lambda: ["umap", "tsne"])
    store_dir: str | None = None
    device: str = "cpu"
    seed: int = 0


TASKS = ("knn", "linear", "segmentation", "anomaly")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(value: str, base: Path | None = None) -> str:
    """``${VAR}`` / ``${VAR:-default}`` from the environment; a relative path is taken from ``base``."""

    def sub(m: re.Match) -> str:
        return os.environ.get(m.group(1)) or (m.group(2) or "")

    text = _ENV.sub(sub, str(value))
    path = Path(text).expanduser()
    if base is not None and not path.is_absolute() and text not in ("random",) and not text.startswith("hub"):
        return str((base / path).resolve())
    return str(path)


def repo_root_of(config_path: Path) -> Path:
    """The folder holding ``configs/`` above a config file (the repository), else the file's folder."""
    for parent in config_path.resolve().parents:
        if (parent / "configs").is_dir() and config_path.resolve().is_relative_to(parent / "configs"):
            return parent
    return config_path.resolve().parent


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> tuple[ExperimentConfig, Path]:
    """Reads an experiment YAML (plus ``key.sub=value`` overrides); returns it and its base folder."""
    cfg = load_config(ExperimentConfig, path, overrides)
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"{path}: unknown task(s) {unknown}; known: {list(TASKS)}")
    names = [e.name for e in cfg.encoders] + [e.name for e in cfg.encoders3d]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: encoder names must be unique, got {names}")
    return cfg, repo_root_of(Path(path))


# -- small helpers ------------------------------------------------------------------------------
# bumped when evaluation code changes its numbers, so cached results are not reused
EVAL_VERSION = 3


def _hash(*parts: Any) -> str:
    h = hashlib.sha1(f"eval-v{EVAL_VERSION}".encode())
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(np.ascontiguousarray(p).tobytes())
            h.update(str(p.shape).encode())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class _SafeUnpickler(pickle.Unpickler):
    """Loads only plain containers and numpy arrays: a tampered cache file cannot run code."""

    _ALLOWED_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                        "numpy._core.numeric", "numpy.dtypes", "collections", "builtins")
    _BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "int", "float", "complex",
                 "bool", "slice", "range"}

    def find_class(self, module: str, name: str):
        if module == "builtins" and name not in self._BUILTINS:
            raise pickle.UnpicklingError(f"refusing builtins.{name}")
        if module.split(".")[0] != "numpy" and module not in self._ALLOWED_MODULES:
            raise pickle.UnpicklingError(f"refusing {module}.{name}")
        return super().find_class(module, name)


class _Cache:
    """Results under ``<out>/cache``, keyed by a hash of everything they depend on.

    Values are plain containers and numpy arrays; reading goes through :class:`_SafeUnpickler`,
    and anything else in a cache file is treated as a miss (recomputed), never executed.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def get(self, kind: str, key: str):
        path = self.root / f"{kind}-{key}.pkl"
        if path.exists():
            try:
                with open(path, "rb") as fh:
                    return _SafeUnpickler(fh).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
                log.warning("ignoring cache file %s (%s)", path, err)
        return None

    def put(self, kind: str, key: str, value) -> None:
        path = self.root / f"{kind}-{key}.pkl"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            pickle.dump(value, fh)
        os.replace(tmp, path)


@dataclass
class EmbeddingSet:
    """Volume embeddings of one encoder (+ aggregator): ids (N,), X (N, D), provenance."""

    name: str
    ids: list[str]
    X: np.ndarray
    provenance: dict = field(default_factory=dict)
    kind: str = "2d"  # "2d" (slice-wise encoder) or "3d"
    entry: Any = None


# -- evaluation on embeddings (no I/O besides the split files) ----------------------------------
def _primary_metric(kind: str) -> str:
    return "roc_auc" if kind == "categorical" else "mae"


def evaluate_sets(sets: Mapping[str, EmbeddingSet], labels, label_types: Mapping[str, str], cfg: ExperimentConfig,
                  split_dir: Path, cache: _Cache | None = None, progress: bool = True) -> dict:
    """k-NN and linear probes of every embedding set on every label, on shared subject-level splits.

    Args:
        sets: name -> :class:`EmbeddingSet` (rows are subjects).
        labels: DataFrame indexed by subject ID.
        label_types: label -> ``categorical`` / ``continuous``.
        split_dir: where ``<label>.json`` splits are saved and reused.

    Returns:
        dict with ``rows`` (metric rows), ``paired`` (tests vs reference), ``predictions``
        (label -> task/variant -> encoder -> (R, N[, C]) out-of-fold predictions), ``splits``
        (label -> path) and ``chosen`` (linear-probe penalties per fold).
    """
    tasks = [t for t in cfg.tasks if t in ("knn", "linear")]
    names = list(sets)
    reference = cfg.reference if cfg.reference in sets else (names[0] if names else None)
    if cfg.reference and cfg.reference not in sets:
        log.warning("reference %r is not an embedding set (have %s); using %r", cfg.reference, names, reference)
    rows, paired, predictions, split_paths, chosen = [], [], {}, {}, {}
    for label, kind in label_types.items():
        column = labels[label]
        id_sets = [set(es.ids) for es in sets.values()]
        common = [s for s in labels.index.astype(str)
                  if all(s in ids_ for ids_ in id_sets) and column.get(s) is not None
                  and not _isnan(column.get(s))]
        if len(common) < 2 * cfg.splits.n_folds:
            log.warning("label %s: only %d subjects with embeddings and a value; skipped", label, len(common))
            continue
        y = column.reindex(common).to_numpy()
        if kind == "continuous":
            y = y.astype(np.float64)
        else:
            y = y.astype(str)
            if len(np.unique(y)) < 2:
                log.warning("label %s has one class; skipped", label)
                continue
        groups = None
        if cfg.splits.group:
            groups = labels[cfg.splits.group].reindex(common).astype(str).to_numpy()
        split_path = split_dir / f"{_safe(label)}.json"
        splits = load_or_make_splits(split_path, common, y, kind, groups=groups, cfg=cfg.splits)
        split_paths[label] = str(split_path)
        ids = splits.subject_ids
        y = column.reindex(ids).to_numpy()
        y = y.astype(np.float64) if kind == "continuous" else y.astype(str)
        classes = np.unique(y) if kind == "categorical" else None
        predictions[label] = {}
        per_set: dict[str, dict] = {}
        keys: dict[str, str] = {}
        for name in names:
            es = sets[name]
            pos = {s: i for i, s in enumerate(es.ids)}
            X = es.X[[pos[s] for s in ids]]
            key = _hash(X, y.tolist(), splits.to_dict(), to_dict(cfg.knn), to_dict(cfg.linear), tasks, cfg.seed)
            result = cache.get("probe", key) if cache else None
            if result is None:
                t0 = time.time()
                result = _probe_one(X, y, kind, classes, splits, cfg, tasks)
                log.info("%s / %s: probes in %.1f s", label, name, time.time() - t0)
                if cache:
                    cache.put("probe", key, result)
            per_set[name] = result
            keys[name] = key
            chosen.setdefault(label, {})[name] = result["chosen"]
        metrics = CLASSIFICATION_METRICS if kind == "categorical" else REGRESSION_METRICS
        primary = _primary_metric(kind)
        for name in names:
            for variant, oof in per_set[name]["oof"].items():
                predictions[label].setdefault(variant, {})[name] = oof
            # intervals are cached too: a rerun only re-renders
            stats_key = _hash(keys[name], label, name, cfg.n_bootstrap, cfg.seed)
            set_rows = cache.get("stats", stats_key) if cache else None
            if set_rows is None:
                set_rows = []
                for variant, oof in per_set[name]["oof"].items():
                    task, var = variant.split(":", 1)
                    for metric in metrics:
                        fn = metric_fn(metric, kind, classes)
                        mean, sd = mean_sd(per_set[name]["fold_metrics"][variant][metric])
                        point, lo, hi = bootstrap_ci(y, oof, fn, n_boot=cfg.n_bootstrap, seed=cfg.seed)
                        set_rows.append({"task": task, "label": label, "encoder": name, "variant": var,
                                         "metric": metric, "mean": mean, "sd": sd, "point": point, "ci_low": lo,
                                         "ci_high": hi, "n_subjects": len(ids), "n_folds": cfg.splits.n_folds,
                                         "n_repeats": splits.n_repeats})
                if cache:
                    cache.put("stats", stats_key, set_rows)
            rows += set_rows
        # paired tests: every encoder vs the reference on the primary variant of each task
        for variant in _primary_variants(cfg, kind, tasks):
            if reference is None:
                break
            ref_oof = predictions[label].get(variant, {}).get(reference)
            if ref_oof is None:
                continue
            fn = metric_fn(primary, kind, classes)
            for name in names:
                if name == reference:
                    continue
                pair_key = _hash(keys[name], keys[reference], variant, primary, cfg.n_bootstrap,
                                 cfg.n_permutations, cfg.seed)
                test = cache.get("paired", pair_key) if cache else None
                if test is None:
                    test = paired_test(y, predictions[label][variant][name], ref_oof, fn, n_boot=cfg.n_bootstrap,
                                       n_perm=cfg.n_permutations, seed=cfg.seed)
                    if cache:
                        cache.put("paired", pair_key, test)
                task, var = variant.split(":", 1)
                paired.append({"task": task, "label": label, "variant": var, "metric": primary, "encoder": name,
                               "reference": reference, **test, "n_subjects": len(ids)})
    return {"rows": rows, "paired": paired, "predictions": predictions, "splits": split_paths,
            "chosen": chosen, "reference": reference}


def _primary_variants(cfg: ExperimentConfig, kind: str, tasks: Sequence[str]) -> list[str]:
    out = []
    if "knn" in tasks:
        k = cfg.primary_k if cfg.primary_k in cfg.knn.ks else cfg.knn.ks[0]
        out.append(f"knn:k={k} weighted")
    if "linear" in tasks:
        out.append("linear:" + ("logistic" if kind == "categorical" else "ridge"))
    return out


def _probe_one(X: np.ndarray, y: np.ndarray, kind: str, classes, splits: SubjectSplits, cfg: ExperimentConfig,
               tasks: Sequence[str]) -> dict:
    """Out-of-fold predictions (R, N[, C]) and per-fold metrics of every probe variant on one set."""
    n, r_count = len(y), splits.n_repeats
    task_kind = "classification" if kind == "categorical" else "regression"
    metrics = CLASSIFICATION_METRICS if kind == "categorical" else REGRESSION_METRICS
    shape = (r_count, n, len(classes)) if kind == "categorical" else (r_count, n)
    oof: dict[str, np.ndarray] = {}
    fold_metrics: dict[str, dict[str, list[float]]] = {}
    chosen: list[float] = []

    def record(variant: str, r: int, te: np.ndarray, pred: np.ndarray) -> None:
        arr = oof.setdefault(variant, np.full(shape, np.nan))
        arr[r, te] = pred
        store = fold_metrics.setdefault(variant, {m: [] for m in metrics})
        for m in metrics:
            store[m].append(metric_fn(m, kind, classes)(y[te], pred))

    def full_proba(p: np.ndarray, probe_classes: np.ndarray) -> np.ndarray:
        out = np.zeros((len(p), len(classes)))
        out[:, np.searchsorted(classes, probe_classes)] = p
        return out

    for fold in splits.folds:
        tr, te = splits.positions(splits.subject_ids, fold)
        if "knn" in tasks:
            knn = KNNProbe(cfg.knn.ks, cfg.knn.temperature, task_kind).fit(X[tr], y[tr])
            for (k, vote), pred in knn.predict(X[te]).items():
                if kind == "categorical":
                    pred = full_proba(pred, knn.classes_)
                record(f"knn:k={k} {vote}", fold.repeat, te, pred)
        if "linear" in tasks:
            lin = LinearProbe(task_kind, cfg.linear, seed=cfg.seed + fold.repeat).fit(X[tr], y[tr])
            chosen.append(float(lin.best_param_))
            if kind == "categorical":
                record("linear:logistic", fold.repeat, te, full_proba(lin.predict_proba(X[te]), lin.classes_))
            else:
                record("linear:ridge", fold.repeat, te, lin.predict(X[te]))
    return {"oof": oof, "fold_metrics": fold_metrics, "chosen": chosen}


def _isnan(v) -> bool:
    return isinstance(v, float) and np.isnan(v)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# -- orchestration ------------------------------------------------------------------------------
def resolve_cohort(cfg: ExperimentConfig, base: Path, out: Path):
    """Loads the manifest (or builds the synthetic cohort once) -> (Cohort, manifest path)."""
    from slice2vol.data.manifest import load_manifest

    if cfg.cohort.manifest:
        manifest = Path(expand(cfg.cohort.manifest, base))
        if not manifest.exists():
            raise FileNotFoundError(f"{manifest}: manifest not found (cohort.manifest={cfg.cohort.manifest!r}; "
                                    "set the environment variable it names or override cohort.manifest=PATH)")
    elif cfg.cohort.synthetic is not None:
        try:
            from slice2vol.data.synthetic import make_cohort
        except ImportError as err:
            raise IntegrationError(f"synthetic cohort unavailable: {err}") from None
        params = dict(cfg.cohort.synthetic)
        target = out / "cohort"
        manifest = target / "manifest.csv"
        stamp = target / "params.json"
        if not (manifest.exists() and stamp.exists() and json.loads(stamp.read_text()) == params):
            log.info("building the synthetic cohort in %s (%s)", target, params)
            manifest = Path(make_cohort(target, **params))
            stamp.write_text(json.dumps(params))
    else:
        raise ValueError("cohort: set manifest or synthetic")
    cohort = load_manifest(manifest, label_types=dict(cfg.cohort.label_types) or None)
    if cfg.cohort.max_subjects:
        cohort = cohort.subset(cohort.ids[: cfg.cohort.max_subjects])
    if cohort.failures:
        log.warning("%s", cohort.failure_report())
    return cohort, manifest


def _labels_of(cohort, cfg: ExperimentConfig):
    labels = cohort.labels()
    types = dict(cohort.label_types)
    wanted = cfg.cohort.labels or [c for c in types]
    missing = [c for c in wanted if c not in labels.columns]
    if missing:
        raise ValueError(f"label(s) {missing} not in the manifest (columns: {list(labels.columns)})")
    return labels, {c: types[c] for c in wanted}


def _store_path(store_dir: Path, entry: Encoder2DEntry, weights: str, cfg: ExperimentConfig) -> Path:
    ident = config_hash({"key": entry.key, "weights": weights, "kwargs": entry.kwargs,
                         "volume": to_dict(cfg.volume), "slices": to_dict(cfg.slices), "tokens": entry.save_tokens,
                         "dtype": entry.dtype})
    return store_dir / f"{_safe(entry.name)}-{ident}.h5"


def build_2d_sets(cfg: ExperimentConfig, cohort, base: Path, store_dir: Path, progress: bool,
                  timings: dict) -> tuple[dict[str, EmbeddingSet], list[str]]:
    """Caches slice features and aggregates them, for every 2D entry; returns sets and failures."""
    try:
        from slice2vol.aggregate import aggregate_store
        from slice2vol.cache import FeatureStore
        from slice2vol.extract import cache_cohort
    except ImportError as err:
        raise IntegrationError(f"2D encoders need slice2vol.extract, slice2vol.cache and slice2vol.aggregate "
                               f"({err})") from None
    sets: dict[str, EmbeddingSet] = {}
    failures: list[str] = []
    for entry in cfg.encoders:
        weights = expand(entry.weights, base) if entry.weights not in ("random",) and not entry.weights.startswith("hub") \
            else entry.weights
        path = _store_path(store_dir, entry, weights, cfg)
        t0 = time.time()
        store = FeatureStore(path, mode="r")
        done = set(store.subjects()) if path.exists() else set()
        todo = [s for s in cohort.ids if s not in done]
        if todo:
            log.info("%s: caching %d subject(s) into %s", entry.name, len(todo), path)
            report = cache_cohort(cohort, entry.key, path, weights=weights, encoder_kwargs=dict(entry.kwargs),
                                  volume_cfg=cfg.volume, slice_cfg=cfg.slices, batch_size=entry.batch_size,
                                  device=cfg.device, save_tokens=entry.save_tokens, progress=progress, seed=cfg.seed,
                                  dtype=entry.dtype)
            failures += [str(f) for f in getattr(report, "failures", [])]
        timings[f"cache:{entry.name}"] = round(time.time() - t0, 2)
        store = FeatureStore(path, mode="r")
        feature_set = store.feature_set
        for agg in entry.aggregators:
            t0 = time.time()
            params = dict(entry.aggregator_params.get(agg, {})) if isinstance(entry.aggregator_params, dict) else {}
            set_name = _safe(agg)
            names = store.volume_embedding_names()
            fresh = False
            if set_name in names:
                ids, X, prov = store.volume_embeddings(set_name)
                fresh = (prov.get("source_feature_set", prov.get("slice_feature_set")) == feature_set
                         and set(ids) == set(store.subjects()) and prov.get("params_requested") == params)
            if not fresh:
                log.info("%s: aggregating with %s", entry.name, agg)
                written = aggregate_store(path, agg, name=set_name, plot=False, **params)
                if written != set_name:
                    set_name = written
                _annotate(path, set_name, params)
                store = FeatureStore(path, mode="r")
            ids, X, prov = store.volume_embeddings(set_name)
            timings[f"aggregate:{entry.name}/{agg}"] = round(time.time() - t0, 2)
            name = f"{entry.name}/{agg}"
            _check_degenerate(name, X)
            prov = {**prov, "store": str(path), "feature_set": feature_set, "encoder_key": entry.key,
                    "weights": weights, "store_provenance": _short_prov(store.provenance)}
            sets[name] = EmbeddingSet(name, list(ids), X, prov, "2d", entry)
    return sets, failures


def _check_degenerate(name: str, X: np.ndarray) -> None:
    """Refuses embeddings that are identical for every subject (nothing to evaluate)."""
    if len(X) > 1 and float(np.abs(X - X[0]).max()) == 0.0:
        raise ValueError(
            f"{name}: every subject has the same embedding (max |x| = {float(np.abs(X).max()):.3g}); the encoder "
            "output is constant or underflowed (e.g. random-init BatchNorm nets give ~1e-8 activations, which "
            "float16 stores round to 0: set dtype: float32 for that encoder entry)")


def _annotate(path: Path, name: str, params: dict) -> None:
    """Rewrites the set with the requested parameters in its provenance (for the freshness check)."""
    from slice2vol.cache import FeatureStore

    store = FeatureStore(path, mode="a")
    ids, X, prov = store.volume_embeddings(name)
    if prov.get("params_requested") != params:
        store.write_volume_embeddings(name, ids, X, {**prov, "params_requested": params})


def _short_prov(prov: Mapping) -> dict:
    keep = ("encoder", "encoder_key", "weights", "weights_sha256", "state_sha256", "model_state_sha256",
            "volume_cfg", "slice_cfg", "encoder_info", "feature_set", "dtype")
    return {k: prov[k] for k in keep if k in prov} or dict(list(prov.items())[:12])


def build_3d_sets(cfg: ExperimentConfig, cohort, manifest: Path, base: Path, store_dir: Path, out: Path,
                  progress: bool, timings: dict) -> tuple[dict[str, EmbeddingSet], dict[str, Any]]:
    """Loads or pretrains every 3D baseline and writes its volume embeddings (once)."""
    sets: dict[str, EmbeddingSet] = {}
    models: dict[str, Any] = {}
    if not cfg.encoders3d:
        return sets, models
    try:
        from slice2vol.cache import FeatureStore
        from slice2vol.ssl import export as ssl_export
    except ImportError as err:
        raise IntegrationError(f"3D baselines need slice2vol.ssl.export and slice2vol.cache ({err}); "
                               "remove encoders3d from the config to run without them") from None
    for entry in cfg.encoders3d:
        t0 = time.time()
        ident = config_hash({"checkpoint": entry.checkpoint, "ssl": entry.ssl, "input_size": list(entry.input_size),
                             "ids": cohort.ids})
        path = store_dir / f"{_safe(entry.name)}-{ident}.h5"
        set_name = _safe(entry.name)
        store = FeatureStore(path, mode="r")
        have = path.exists() and set_name in store.volume_embedding_names()
        try:
            model = _load_or_train_3d(entry, cohort, manifest, base, out, progress)  # cheap once trained
        except (ValueError, OSError, KeyError) as err:
            if not have:
                raise
            # the embeddings are there; only the anomaly task needs the network itself
            log.warning("%s: cannot load the 3D encoder (%s); its anomaly scores are skipped", entry.name, err)
            model = None
        if not have:
            ssl_export.embed_cohort(model, cohort, path, set_name, input_size=tuple(entry.input_size),
                                    progress=progress)
            store = FeatureStore(path, mode="r")
        ids, X, prov = store.volume_embeddings(set_name)
        prov = {**prov, "store": str(path)}
        sets[entry.name] = EmbeddingSet(entry.name, list(ids), X, prov, "3d", entry)
        models[entry.name] = model
        timings[f"3d:{entry.name}"] = round(time.time() - t0, 2)
    return sets, models


def _load_or_train_3d(entry: Encoder3DEntry, cohort, manifest: Path, base: Path, out: Path, progress: bool):
    """A 3D encoder module ``(B, C, X, Y, Z) -> (B, D)`` from a checkpoint or a short SSL run."""
    try:
        from slice2vol.ssl import export as ssl_export
    except ImportError as err:  # pragma: no cover - checked by the caller
        raise IntegrationError(str(err)) from None
    if entry.checkpoint:
        ckpt = expand(entry.checkpoint, base)
        loader = getattr(ssl_export, "load_encoder", None)
        if loader is None:
            raise IntegrationError("slice2vol.ssl.export.load_encoder is missing: cannot load 3D checkpoints")
        return loader(ckpt)
    ckpt_dir = out / "ssl" / f"{_safe(entry.name)}-{config_hash(entry.ssl)}"  # a new config never resumes an old run
    last = ckpt_dir / "last"
    loader = getattr(ssl_export, "load_encoder", None)
    if last.exists() and loader is not None:
        return loader(last)
    try:
        from slice2vol.ssl import train as ssl_train
        from slice2vol.ssl.config import SSLConfig
    except ImportError as err:
        raise IntegrationError(f"3D pretraining needs slice2vol.ssl.train ({err}); give encoders3d[].checkpoint "
                               "or remove the 3D baseline") from None
    ssl_cfg = from_dict(SSLConfig, dict(entry.ssl), f"encoders3d.{entry.name}.ssl")
    fn = getattr(ssl_train, "pretrain", None) or getattr(ssl_train, "train", None)
    if fn is None:
        raise IntegrationError("slice2vol.ssl.train has no pretrain()/train() function")
    result = fn(ssl_cfg, manifest, ckpt_dir, progress=progress)
    if loader is not None and last.exists():
        return loader(last)
    if hasattr(result, "forward"):
        return result
    raise IntegrationError(f"cannot obtain a 3D encoder from the SSL run in {ckpt_dir}")


# -- dense probe --------------------------------------------------------------------------------
def _nearest_fill(grid, kept: np.ndarray, axis: int):
    """Copies each skipped slice (along ``axis`` of a (K, X, Y, Z) tensor) from the nearest kept one."""
    import torch

    n = grid.shape[1 + axis]
    nearest = kept[np.abs(np.arange(n)[:, None] - kept[None]).argmin(1)]
    return grid.index_select(1 + axis, torch.as_tensor(nearest, device=grid.device))


def run_segmentation(cfg: ExperimentConfig, cohort, base: Path, out: Path, cache: _Cache, progress: bool,
                     timings: dict) -> dict:
    """Dense linear probe of every 2D encoder; Dice per structure per subject (out-of-fold)."""
    import torch

    from slice2vol.data.manifest import load_subject
    from slice2vol.data.slicing import PLANES, slice_volume, slices_to_grid
    from slice2vol.encoders.base import build_encoder
    from slice2vol.eval.segmentation import (DenseLinearProbe, apply_lut, dice_per_class, label_lut, labels_in_box,
                                             muse_structures, place_in_box, token_box)

    sc = cfg.segmentation
    subjects = [s for s in cohort.subjects if s.seg is not None][: sc.max_subjects or None]
    if len(subjects) < 2 * min(cfg.splits.n_folds, 3):
        log.warning("segmentation: %d subjects with a segmentation; skipped", len(subjects))
        return {"rows": [], "per_subject": [], "overlay": None}
    structures = {k: [int(v) for v in vs] for k, vs in sc.structures.items()}
    if sc.mapping_csv:
        structures = muse_structures(structures, expand(sc.mapping_csv, base))
    lut = label_lut(structures, max_label=255)
    names = list(structures)
    ids = [s.subject_id for s in subjects]
    n_folds = min(cfg.splits.n_folds, len(ids) // 2)
    splits = load_or_make_splits(out / "splits" / "segmentation.json", ids, None, "categorical",
                                 cfg=SplitConfig(n_folds=n_folds, n_repeats=1, seed=cfg.seed))
    slice_cfg = SliceConfig(planes=(sc.plane,), stride=sc.stride, min_foreground=0.0, context=cfg.slices.context,
                            size=sc.size)
    axis = PLANES[sc.plane]
    rows, per_subject, overlay = [], [], {"predictions": {}}
    volumes = None
    for entry in cfg.encoders:
        weights = expand(entry.weights, base) if entry.weights not in ("random",) and not entry.weights.startswith("hub") \
            else entry.weights
        kwargs = {**entry.kwargs, **sc.encoder_kwargs}
        key = _hash("seg", entry.key, weights, kwargs, to_dict(sc), structures, to_dict(cfg.volume), ids,
                    splits.to_dict(), cfg.seed, cfg.slices.context)
        result = cache.get("seg", key)
        t0 = time.time()
        if result is None:
            if volumes is None:
                volumes = [load_subject(s, cfg.volume) for s in subjects]
            torch.manual_seed(cfg.seed)
            encoder = build_encoder(entry.key, weights=weights, **kwargs).to(cfg.device)
            box = token_box(encoder.info, sc.size)
            feats, labels, plane_slices = [], [], []
            iterator = volumes
            if progress:
                from tqdm.auto import tqdm

                iterator = tqdm(volumes, desc=f"seg tokens {entry.name}", unit="vol")
            grid = (0, 0)
            for vol in iterator:
                ps = slice_volume(vol, slice_cfg)[sc.plane]
                tokens, grid = encoder.embed(ps.images, entry.batch_size, tokens=True)
                # bfloat16 keeps float32's exponent: random-init tokens (~1e-8) would be 0 in float16
                feats.append(tokens.cpu().to(torch.bfloat16))
                lab = apply_lut(ps.labels, lut)
                labels.append(labels_in_box(lab, box, (grid[0] * sc.label_scale, grid[1] * sc.label_scale)).to(torch.uint8))
                plane_slices.append(ps)
            dice = np.full((len(ids), len(names)), np.nan)
            example = None
            for fold in splits.folds:
                tr, te = splits.positions(ids, fold)
                probe = DenseLinearProbe(len(names), sc.epochs, sc.lr, sc.weight_decay, sc.batch_size, cfg.seed)
                probe.fit(torch.cat([feats[i] for i in tr]).float(), grid, torch.cat([labels[i] for i in tr]).long())
                for i in te:
                    ps = plane_slices[i]
                    proba = probe.predict_proba(feats[i].float(), grid, (box[2], box[3]))
                    full = place_in_box(proba, box, sc.size)
                    vol_proba = slices_to_grid(full, ps, volumes[i].shape)
                    vol_proba = _nearest_fill(vol_proba, ps.indices, axis)
                    pred = vol_proba.argmax(0).numpy()
                    truth = apply_lut(volumes[i].seg, lut)
                    dice[i] = dice_per_class(pred, truth, len(names))
                    if i == 0:
                        example = _overlay_slice(volumes[i], pred, truth, axis)
            result = {"dice": dice, "example": example, "grid": list(grid),
                      "final_loss": float(probe.losses_[-1]) if probe.losses_ else None,
                      "weights_sha256": getattr(encoder.info, "weights_sha256", None)}
            cache.put("seg", key, result)
            del feats, labels, plane_slices
        timings[f"segmentation:{entry.name}"] = round(time.time() - t0, 2)
        dice = result["dice"]
        for j, structure in enumerate(names):
            vals = dice[:, j]
            finite = np.isfinite(vals)
            mean, sd = mean_sd(vals)
            point, lo, hi = bootstrap_ci(vals[finite], vals[finite][None], lambda y, p: float(np.mean(p)),
                                         n_boot=cfg.n_bootstrap, seed=cfg.seed)
            rows.append({"task": "segmentation", "label": structure, "encoder": entry.name,
                         "variant": f"{sc.plane} linear, tokens {result['grid'][0]}x{result['grid'][1]}",
                         "metric": "dice", "mean": mean, "sd": sd, "point": point, "ci_low": lo, "ci_high": hi,
                         "n_subjects": int(finite.sum()), "n_folds": n_folds, "n_repeats": 1})
        for i, sid in enumerate(ids):
            per_subject.append({"encoder": entry.name, "subject_id": sid,
                                **{s: float(dice[i, j]) for j, s in enumerate(names)}})
        if result["example"] is not None:
            overlay["image"], overlay["truth"] = result["example"]["image"], result["example"]["truth"]
            overlay["predictions"][entry.name] = result["example"]["pred"]
            overlay["subject"] = ids[0]
    overlay["classes"] = names
    return {"rows": rows, "per_subject": per_subject, "overlay": overlay if overlay["predictions"] else None,
            "structures": structures}


def _overlay_slice(volume, pred: np.ndarray, truth: np.ndarray, axis: int) -> dict:
    """Middle slice through the brain along ``axis``, in display orientation (superior up)."""
    brain = np.argwhere(truth > 0)
    mid = int(np.median(brain[:, axis])) if len(brain) else volume.shape[axis] // 2

    def cut(a: np.ndarray) -> np.ndarray:
        return np.flipud(np.take(a, mid, axis=axis).T)

    return {"image": cut(volume.data[0]), "truth": cut(truth), "pred": cut(pred)}


# -- anomaly detection --------------------------------------------------------------------------
def _embedder_2d(encoder, cfg: ExperimentConfig) -> Callable:
    from slice2vol.data.slicing import slice_volume

    ac = cfg.anomaly
    slice_cfg = SliceConfig(planes=(ac.plane,), stride=ac.stride, min_foreground=cfg.slices.min_foreground,
                            context=cfg.slices.context, size=ac.size)

    def embed(volume, lesion: np.ndarray | None):
        ps = slice_volume(volume, slice_cfg)[ac.plane]
        feats = encoder.embed(ps.images, 32).cpu().numpy().astype(np.float32)
        from slice2vol.data.slicing import PLANES

        axis = PLANES[ac.plane]
        hit = np.zeros(len(ps.indices), dtype=bool)
        if lesion is not None:
            per_slice = lesion.sum(axis=tuple(a for a in range(3) if a != axis))
            hit = per_slice[ps.indices] >= 5
        return feats.mean(0), feats, hit

    return embed


def _embedder_3d(model, input_size: Sequence[int], margin: int = 4) -> Callable:
    """Whole-volume embedding as :func:`slice2vol.ssl.export.embed_cohort` does it: the head box
    (plus ``margin`` voxels) fitted into ``input_size`` with its aspect ratio kept."""
    import torch

    from slice2vol.ssl.data import fit_to_grid

    def embed(volume, lesion):
        box = np.argwhere(volume.mask)
        lo = np.maximum(box.min(0) - margin, 0) if len(box) else np.zeros(3, int)
        hi = np.minimum(box.max(0) + margin + 1, volume.shape) if len(box) else np.asarray(volume.shape)
        data = volume.data[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        image = fit_to_grid(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), volume.spacing,
                            tuple(input_size))
        with torch.no_grad():
            z = model(image[None])
        return z.reshape(-1).numpy().astype(np.float32), None, None

    return embed


def run_anomaly(cfg: ExperimentConfig, cohort, base: Path, out: Path, models3d: Mapping[str, Any], cache: _Cache,
                progress: bool, timings: dict) -> dict:
    """Simulated lesions on held-out healthy volumes; subject- and slice-level AUROC per scorer."""
    import torch

    from slice2vol.data.manifest import load_subject
    from slice2vol.encoders.base import build_encoder
    from slice2vol.eval.anomaly import build_scorer, simulate_lesions
    from slice2vol.eval.metrics import _binary_auc

    ac = cfg.anomaly
    subjects = cohort.subjects[: ac.max_subjects or None]
    ids = [s.subject_id for s in subjects]
    n_folds = min(cfg.splits.n_folds, len(ids) // 2)
    splits = load_or_make_splits(out / "splits" / "anomaly.json", ids, None, "categorical",
                                 cfg=SplitConfig(n_folds=n_folds, n_repeats=1, seed=cfg.seed))
    embedders: dict[str, tuple[str, Any]] = {}
    for entry in cfg.encoders:
        weights = expand(entry.weights, base) if entry.weights not in ("random",) and not entry.weights.startswith("hub") \
            else entry.weights
        embedders[entry.name] = ("2d", (entry, weights))
    for entry in cfg.encoders3d:
        if models3d.get(entry.name) is not None:
            embedders[entry.name] = ("3d", entry)
    rows, example = [], None
    volumes = lesioned = None
    for name, (kind, spec) in embedders.items():
        ident = ([spec[0].key, spec[1], spec[0].kwargs] if kind == "2d" else
                 [spec.name, spec.checkpoint, spec.ssl, list(spec.input_size)])
        key = _hash("anomaly", kind, ident, to_dict(ac), to_dict(cfg.volume), ids, cfg.seed, cfg.slices.context,
                    cfg.slices.min_foreground)
        result = cache.get("anomaly", key)
        t0 = time.time()
        if result is None:
            if volumes is None:
                volumes = [load_subject(s, cfg.volume) for s in subjects]
                lesioned = [simulate_lesions(v, np.random.default_rng([cfg.seed, ac.seed, i]), ac)
                            for i, v in enumerate(volumes)]
            if kind == "2d":
                torch.manual_seed(cfg.seed)
                entry, weights = spec
                encoder = build_encoder(entry.key, weights=weights, **entry.kwargs).to(cfg.device)
                embed = _embedder_2d(encoder, cfg)
            else:
                embed = _embedder_3d(models3d[name], spec.input_size)
            healthy, sick = [], []
            iterator = range(len(volumes))
            if progress:
                from tqdm.auto import tqdm

                iterator = tqdm(iterator, desc=f"anomaly {name}", unit="vol")
            for i in iterator:
                healthy.append(embed(volumes[i], None))
                sick.append(embed(lesioned[i][0], lesioned[i][1]))
            result = _score_anomaly(healthy, sick, splits, ids, ac, build_scorer, _binary_auc)
            cache.put("anomaly", key, result)
        timings[f"anomaly:{name}"] = round(time.time() - t0, 2)
        for scorer, res in result["subject"].items():
            rows.append(_auc_row(name, scorer, "subject", res, cfg, len(ids), n_folds))
        for scorer, res in result.get("slice", {}).items():
            rows.append(_auc_row(name, scorer, "slice", res, cfg, len(ids), n_folds))
    if volumes is not None and lesioned is not None:
        example = _lesion_example(volumes[0], *lesioned[0])
    else:
        example = cache.get("anomaly-example", _hash(ids, to_dict(ac), cfg.seed))
    if example is not None:
        cache.put("anomaly-example", _hash(ids, to_dict(ac), cfg.seed), example)
    return {"rows": rows, "example": example}


def _score_anomaly(healthy, sick, splits: SubjectSplits, ids, ac: AnomalyConfig, build_scorer, auc_fn) -> dict:
    h = np.stack([e[0] for e in healthy])
    s = np.stack([e[0] for e in sick])
    n = len(ids)
    out: dict[str, dict] = {"subject": {}, "slice": {}}
    for scorer_name in ac.scorers:
        score_h, score_s, fold_auc = np.full(n, np.nan), np.full(n, np.nan), []
        slice_scores, slice_truth, slice_owner, slice_fold_auc = [], [], [], []
        for fold in splits.folds:
            tr, te = splits.positions(ids, fold)
            scorer = build_scorer(scorer_name, ac).fit(h[tr])
            score_h[te], score_s[te] = scorer.score(h[te]), scorer.score(s[te])
            fold_auc.append(auc_fn(np.r_[np.zeros(len(te)), np.ones(len(te))].astype(bool),
                                   np.r_[score_h[te], score_s[te]]))
            if healthy[0][1] is not None and scorer_name == "knn":
                # slice level: healthy training slices are the reference set
                ref = np.concatenate([healthy[i][1] for i in tr])
                sl_scorer = build_scorer("knn", ac).fit(ref)
                fs, ft = [], []
                for i in te:
                    hit = sick[i][2]
                    if len(healthy[i][1]) != len(hit) or not hit.any():
                        continue
                    # positives: lesion-cutting slices; negatives: the SAME slices of the healthy scan,
                    # so slice position (edge slices look atypical) cannot drive the AUROC
                    for feats, truth in ((healthy[i][1][hit], np.zeros(int(hit.sum()), bool)),
                                         (sick[i][1][hit], np.ones(int(hit.sum()), bool))):
                        fs.append(sl_scorer.score(feats))
                        ft.append(truth)
                        slice_owner.append(np.full(len(feats), i))
                if not fs:
                    continue
                fs_arr, ft_arr = np.concatenate(fs), np.concatenate(ft)
                slice_scores.append(fs_arr)
                slice_truth.append(ft_arr)
                slice_fold_auc.append(auc_fn(ft_arr, fs_arr))
        out["subject"][scorer_name] = {"healthy": score_h, "lesioned": score_s, "fold_auc": fold_auc}
        if slice_scores:
            out["slice"]["knn"] = {"scores": np.concatenate(slice_scores), "truth": np.concatenate(slice_truth),
                                   "owner": np.concatenate(slice_owner), "fold_auc": slice_fold_auc}
    return out


def _auc_row(name: str, scorer: str, level: str, res: dict, cfg: ExperimentConfig, n_subjects: int,
             n_folds: int) -> dict:
    from slice2vol.eval.metrics import _binary_auc

    mean, sd = mean_sd(res["fold_auc"])
    rng = np.random.default_rng(cfg.seed)
    if level == "subject":
        h, s = res["healthy"], res["lesioned"]
        n = len(h)
        truth = np.r_[np.zeros(n), np.ones(n)].astype(bool)
        point = _binary_auc(truth, np.r_[h, s])
        boots = []
        for _ in range(cfg.n_bootstrap):
            idx = rng.integers(0, n, n)  # a subject brings its healthy and its lesioned scan
            boots.append(_binary_auc(truth[np.r_[idx, idx + n]], np.r_[h[idx], s[idx]]))
    else:
        scores, truth, owner = res["scores"], res["truth"], res["owner"]
        point = _binary_auc(truth, scores)
        # slices of one subject are not independent: resample whole subjects (cluster bootstrap)
        members = [np.flatnonzero(owner == i) for i in range(n_subjects)]
        boots = []
        for _ in range(cfg.n_bootstrap):
            idx = np.concatenate([members[i] for i in rng.integers(0, n_subjects, n_subjects)])
            boots.append(_binary_auc(truth[idx], scores[idx]))
    b = np.asarray([v for v in boots if np.isfinite(v)])
    lo, hi = (float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))) if len(b) else (np.nan, np.nan)
    return {"task": "anomaly", "label": f"{level}-level", "encoder": name, "variant": scorer, "metric": "auroc",
            "mean": mean, "sd": sd, "point": float(point), "ci_low": lo, "ci_high": hi, "n_subjects": n_subjects,
            "n_folds": n_folds, "n_repeats": 1}


def _lesion_example(volume, lesioned, lesion: np.ndarray) -> dict:
    z = int(np.argmax(lesion.sum((0, 1)))) if lesion.any() else volume.shape[2] // 2

    def cut(a: np.ndarray) -> np.ndarray:
        return np.flipud(a[:, :, z].T)

    return {"healthy": cut(volume.data[0]), "lesioned": cut(lesioned.data[0]), "lesion": cut(lesion)}


# -- figures and report -------------------------------------------------------------------------
def make_figures(sets: Mapping[str, EmbeddingSet], labels, label_types, ev: dict, seg: dict | None,
                 anomaly: dict | None, cfg: ExperimentConfig, fig_dir: Path, cache_dir: Path) -> list[tuple[str, Path]]:
    """Every PNG of the report, in display order, as (caption, path)."""
    from slice2vol.eval import plots

    fig_dir.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Path]] = []
    rows = ev["rows"]
    for label, kind in label_types.items():
        metric = _primary_metric(kind)
        chosen = [r for r in rows if r["label"] == label and r["metric"] == metric]
        if not chosen:
            continue
        pretty = metric.upper().replace("ROC_AUC", "ROC AUC")
        for r in chosen:
            r["probe"] = f"{r['task']}: {r['variant']}"
        path = plots.score_bars(chosen, fig_dir / f"bars_{_safe(label)}.png", group_key="probe",
                                title=f"{label}: {pretty} by probe (95% bootstrap CI)"
                                + (" — lower is better" if metric in LOWER_IS_BETTER else ""),
                                metric_label=pretty, chance=0.5 if metric == "roc_auc" else None)
        figures.append((f"{label} ({kind}): {pretty} of every probe and encoder, pooled out-of-fold estimate "
                        "with subject-level bootstrap 95% interval", path))
    if sets:
        emb = {n: (es.ids, es.X) for n, es in sets.items()}
        for method in cfg.plots:
            try:
                path = plots.embedding_grid(emb, labels, label_types, method, fig_dir / f"{method}.png",
                                            seed=cfg.seed, cache_dir=cache_dir)
                figures.append((f"{method.upper()} of the volume embeddings of each encoder (columns), coloured "
                                "by each label (rows)", path))
            except Exception as err:  # a projection failure must not lose the rest of the report
                log.warning("%s projection failed: %s", method, err)
    if seg and seg["rows"]:
        path = plots.score_bars(seg["rows"], fig_dir / "segmentation_dice.png", group_key="label",
                                title="Dense linear probe: Dice per structure (95% bootstrap CI)", metric_label="Dice")
        figures.append(("Segmentation probe: mean Dice per structure over held-out subjects (3D, original grid)", path))
        ov = seg.get("overlay")
        if ov:
            path = plots.segmentation_overlay(ov["image"], ov["truth"], ov["predictions"], ov["classes"],
                                              fig_dir / "segmentation_overlay.png",
                                              title=f"{ov['subject']} (held out): ground truth and probe predictions")
            figures.append(("Segmentation overlay on a held-out subject, prediction reassembled in 3D then cut", path))
    if anomaly and anomaly["rows"]:
        for r in anomaly["rows"]:
            r["level_scorer"] = f"{r['label']} {r['variant']}"
        path = plots.score_bars(anomaly["rows"], fig_dir / "anomaly_auroc.png", group_key="level_scorer",
                                title="Anomaly detection on simulated lesions: AUROC (95% CI)", metric_label="AUROC",
                                chance=0.5)
        figures.append(("Anomaly detection: AUROC of healthy vs lesioned held-out scans (subject level) and of "
                        "lesion-cutting slices (slice level, k-NN scorer)", path))
        ex = anomaly.get("example")
        if ex:
            path = plots.lesion_example(ex["healthy"], ex["lesioned"], ex["lesion"], fig_dir / "anomaly_example.png",
                                        title="Simulated lesions drawn into a real held-out scan")
            figures.append(("Example of simulated lesions", path))
    return figures


def _weights_file_missing(entry: Encoder2DEntry, base: Path) -> bool:
    if entry.weights == "random" or entry.weights.startswith("hub"):
        return False
    return not Path(expand(entry.weights, base)).exists()


def run_experiment(cfg: ExperimentConfig, *, base: Path, out: Path, progress: bool = True,
                   config_path: str | None = None) -> dict:
    """Runs every stage; returns {"paths": report files, "rows": ..., "paired": ..., "timings": ...}."""
    import platform

    from slice2vol.eval.report import write_report

    t_start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store_dir = Path(expand(cfg.store_dir, base)) if cfg.store_dir else out / "stores"
    store_dir.mkdir(parents=True, exist_ok=True)
    cache = _Cache(out / "cache")
    timings: dict[str, float] = {}
    cohort, manifest = resolve_cohort(cfg, base, out)
    labels, label_types = _labels_of(cohort, cfg)
    log.info("cohort: %d subjects from %s; labels %s", len(cohort), manifest, label_types)

    skipped = [e for e in cfg.encoders if e.optional and _weights_file_missing(e, base)]
    for entry in skipped:
        log.warning("%s: weights %s not found; skipping this optional encoder", entry.name,
                    expand(entry.weights, base))
    cfg = dataclasses.replace(cfg, encoders=[e for e in cfg.encoders if e not in skipped])
    sets, failures = (build_2d_sets(cfg, cohort, base, store_dir, progress, timings) if cfg.encoders else ({}, []))
    sets3d, models3d = build_3d_sets(cfg, cohort, manifest, base, store_dir, out, progress, timings)
    sets.update(sets3d)
    if not sets:
        raise ValueError("no embedding set: list encoders and/or encoders3d in the config")
    t0 = time.time()
    ev = evaluate_sets(sets, labels, label_types, cfg, out / "splits", cache, progress)
    timings["probes"] = round(time.time() - t0, 2)
    seg = anomaly = None
    if "segmentation" in cfg.tasks and cfg.encoders:
        seg = run_segmentation(cfg, cohort, base, out, cache, progress, timings)
    if "anomaly" in cfg.tasks:
        anomaly = run_anomaly(cfg, cohort, base, out, models3d, cache, progress, timings)
    t0 = time.time()
    figures = make_figures(sets, labels, label_types, ev, seg, anomaly, cfg, out / "figures", out / "cache")
    timings["figures"] = round(time.time() - t0, 2)
    rows = ev["rows"] + (seg["rows"] if seg else []) + (anomaly["rows"] if anomaly else [])
    for r in rows:
        r.pop("probe", None)
        r.pop("level_scorer", None)
    timings["total"] = round(time.time() - t_start, 2)
    try:
        from slice2vol.cache import library_versions

        versions = library_versions()
    except ImportError:
        versions = {"python": platform.python_version()}
    provenance = {
        "config_file": config_path, "manifest": str(manifest), "n_subjects": len(cohort),
        "cohort_failures": [str(f) for f in cohort.failures] + failures,
        "embedding_sets": {n: {"n": len(es.ids), "dim": int(es.X.shape[1]), "kind": es.kind, **es.provenance}
                           for n, es in sets.items()},
        "splits": ev["splits"], "reference": ev["reference"], "linear_chosen_penalty": ev["chosen"],
        "timings_s": timings, "versions": versions,
        "segmentation_structures": seg.get("structures") if seg else None,
    }
    notes = [
        f"Cohort: {len(cohort)} subjects ({manifest}). Labels: "
        + ", ".join(f"{k} ({v})" for k, v in label_types.items()) + ".",
        f"Protocol: subject-level {cfg.splits.n_folds}-fold cross-validation x {cfg.splits.n_repeats} repeat(s) "
        f"(seed {cfg.splits.seed}), stratified by class or by {cfg.splits.n_bins} quantile bins; the same saved "
        "splits for every encoder. k-NN: L2-normalised cosine, temperature-weighted (T = "
        f"{cfg.knn.temperature}) and majority votes; linear: L2 logistic / ridge, penalty chosen on inner folds "
        "of the training fold, standardised inside the training fold.",
        f"Reference encoder for paired tests: {ev['reference']}.",
    ]
    extra = {"segmentation_per_subject": seg["per_subject"] if seg else [], "timings_s": timings}
    paths = write_report(out, title=f"slice2vol benchmark: {cfg.name}", rows=rows, paired=ev["paired"],
                         figures=figures, config=to_dict(cfg), provenance=provenance, notes=notes, extra=extra)
    log.info("report: %s (%.1f s)", paths["report.html"], time.time() - t_start)
    return {"paths": paths, "rows": rows, "paired": ev["paired"], "timings": timings, "failures": failures,
            "figures": figures}

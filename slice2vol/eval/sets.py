"""Stages 2-3 of a benchmark: volume-embedding sets (2D encoder + aggregator, native 3D).

An :class:`EmbeddingSet` is what every probe task evaluates: one row per subject. A set answers
``fold_features(frame, fold)`` with the (train, test) rows of one fold, so a set whose embedding is
itself fitted (a trainable aggregator) can be refitted per training fold behind the same call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from slice2vol.config import config_hash, from_dict, to_dict
from slice2vol.eval.cohort import safe_name
from slice2vol.eval.experiment import (Encoder2DEntry, Encoder3DEntry, ExperimentConfig, IntegrationError, expand,
                                       resolve_weights)

log = logging.getLogger(__name__)


@dataclass
class EmbeddingSet:
    """Volume embeddings of one encoder (+ aggregator): ids (N,), X (N, D), provenance.

    Attributes:
        kind: ``2d`` (slice-wise encoder), ``3d``, ``features`` (brought by the user), ``baseline``
            or ``chance``.
        entry: the config entry it came from (encoders need it to re-embed volumes).
    """

    name: str
    ids: list[str]
    X: np.ndarray
    provenance: dict = field(default_factory=dict)
    kind: str = "2d"
    entry: Any = None

    @property
    def dim(self) -> int:
        return int(self.X.shape[1])

    def rows(self, ids) -> np.ndarray:
        """(len(ids), D) rows of these subjects, in that order."""
        pos = {s: i for i, s in enumerate(self.ids)}
        return self.X[[pos[s] for s in ids]]

    def identity(self, frame=None) -> Any:
        """What a result cache key needs to know of this set (its content, never its path)."""
        return self.X

    def fold_features(self, frame, fold) -> tuple[np.ndarray, np.ndarray]:
        """(X_train, X_test) of one fold of ``frame`` (a :class:`~slice2vol.eval.cohort.LabelSplits`)."""
        return self.rows(fold.train), self.rows(fold.test)


_SHA_CACHE: dict[tuple, str] = {}


def weights_identity(weights: str) -> str:
    """What a cache key needs of a weights string: ``sha256:<hex>`` of a local file (never its path),
    else the string itself (``random``, ``hub:...``, ``package``)."""
    path = Path(weights)
    if weights in ("random", "package") or weights.startswith("hub") or not path.is_file():
        return weights
    import hashlib

    stat = path.stat()
    ident = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if ident not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[ident] = "sha256:" + h.hexdigest()
    return _SHA_CACHE[ident]


def weights_file_missing(entry: Encoder2DEntry, base: Path) -> bool:
    """True when the entry names a local weights file that does not exist."""
    weights = resolve_weights(entry.weights, base)
    return weights not in ("random", "package") and not weights.startswith("hub") and not Path(weights).exists()


def store_path(store_dir: Path, entry: Encoder2DEntry, weights: str, cfg: ExperimentConfig) -> Path:
    ident = config_hash({"key": entry.key, "weights": weights, "kwargs": entry.kwargs,
                         "volume": to_dict(cfg.volume), "slices": to_dict(cfg.slices), "tokens": entry.save_tokens,
                         "dtype": entry.dtype})
    return store_dir / f"{safe_name(entry.name)}-{ident}.h5"


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
        weights = resolve_weights(entry.weights, base)
        path = store_path(store_dir, entry, weights, cfg)
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
            set_name = safe_name(agg)
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
            check_degenerate(name, X)
            prov = {**prov, "store": str(path), "feature_set": feature_set, "encoder_key": entry.key,
                    "weights": weights, "store_provenance": _short_prov(store.provenance)}
            sets[name] = EmbeddingSet(name, list(ids), X, prov, "2d", entry)
    return sets, failures


def check_degenerate(name: str, X: np.ndarray) -> None:
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
        path = store_dir / f"{safe_name(entry.name)}-{ident}.h5"
        set_name = safe_name(entry.name)
        store = FeatureStore(path, mode="r")
        have = path.exists() and set_name in store.volume_embedding_names()
        try:
            model = load_or_train_3d(entry, cohort, manifest, base, out, progress)  # cheap once trained
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


def load_or_train_3d(entry: Encoder3DEntry, cohort, manifest: Path, base: Path, out: Path, progress: bool):
    """A 3D encoder module ``(B, C, X, Y, Z) -> (B, D)`` from a checkpoint or a short SSL run."""
    try:
        from slice2vol.ssl import export as ssl_export
    except ImportError as err:  # pragma: no cover - checked by the caller
        raise IntegrationError(str(err)) from None
    loader = getattr(ssl_export, "load_encoder", None)
    if entry.checkpoint:
        if loader is None:
            raise IntegrationError("slice2vol.ssl.export.load_encoder is missing: cannot load 3D checkpoints")
        return loader(expand(entry.checkpoint, base))
    ckpt_dir = out / "ssl" / f"{safe_name(entry.name)}-{config_hash(entry.ssl)}"  # a new config never resumes an old run
    last = ckpt_dir / "last"
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

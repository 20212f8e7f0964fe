"""Stage 2 of a benchmark: volume-embedding sets of 2D encoders (slice features + aggregator).

An :class:`EmbeddingSet` is what every probe task evaluates: one row per subject. A set answers
``fold_features(frame, fold)`` with the (train, test) rows of one fold, so a set whose embedding is
itself fitted (a trainable aggregator) can be refitted per training fold behind the same call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from slice2vol.config import config_hash, to_dict
from slice2vol.eval.cohort import safe_name
from slice2vol.eval.experiment import Encoder2DEntry, ExperimentConfig, IntegrationError, expand, resolve_weights

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
    # disclosure (results["sets"]): a model fitted for this set, label-free pretraining, and on whom
    fitted: dict | None = None
    pretraining: dict | None = None
    fit_subjects: list = field(default_factory=list)

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
    """True when the entry's weights are not on this machine: a local file that does not exist, or
    ``pretrained``/``imagenet``/``package`` weights that the resolver cannot find (an optional entry
    is then skipped instead of failing the run)."""
    from slice2vol.encoders.base import PRETRAINED_WORDS, WeightsUnavailable

    weights = resolve_weights(entry.weights, base)
    if weights in PRETRAINED_WORDS:
        from slice2vol.encoders import build_encoder

        try:  # the resolver only looks at local places; building a network costs about a second
            build_encoder(entry.key, weights=weights, **entry.kwargs)
        except WeightsUnavailable:
            return True
        return False
    return weights != "random" and not weights.startswith("hub") and not Path(weights).exists()


def store_path(store_dir: Path, entry: Encoder2DEntry, weights: str, cfg: ExperimentConfig) -> Path:
    ident = config_hash({"key": entry.key, "weights": weights, "kwargs": entry.kwargs,
                         "volume": to_dict(cfg.volume), "slices": to_dict(cfg.slices), "tokens": entry.save_tokens,
                         "dtype": entry.dtype})
    return store_dir / f"{safe_name(entry.name)}-{ident}.h5"


def changed_inputs(store, path: Path, cohort) -> dict[str, str]:
    """Subject -> failure line, for the cohort subjects whose input files differ from those ``store``
    cached (the stored input fingerprint: size and mtime, then sha256 only where those differ).

    A bench ``store:`` entry is never recached, so a manifest row pointing at another scan would
    otherwise be scored with the old scan's features. Rows without a recorded fingerprint (stores
    written before format 2) cannot be checked and pass, as before.
    """
    from slice2vol.data.io import fingerprint_changes

    have = set(store.subjects())
    planes = store.planes
    changed: dict[str, str] = {}
    for subject in cohort.subjects:
        sid = subject.subject_id
        if sid not in have:
            continue
        # the inputs are the subject's, not a plane's: the first plane that records them is enough
        stored = next((rec for plane in planes if (rec := store.subject_inputs(sid, plane)) and rec.get("files")),
                      None)
        if stored is None:
            continue
        files = stored["files"]
        if set(files) != set(subject.images) and len(files) == len(subject.images):
            # the bench manifest may name the image columns differently ('t1' -> 'image'): the files,
            # in manifest order, are what the features were made from
            files = dict(zip(subject.images, files.values()))
        what = fingerprint_changes(files, subject.images)
        if what:
            changed[sid] = f"{sid}: input changed since {path} cached it ({'; '.join(what)}): cache it again"
    return changed


def cached_store(entry: Encoder2DEntry, cfg: ExperimentConfig, cohort, base: Path, store_dir: Path,
                 progress: bool) -> tuple[Path, list[str], set[str]]:
    """The slice-feature store of a 2D entry: its own ``store``, or one cached now (missing subjects only).

    Returns:
        (store path, failure lines, subjects to leave out of its sets: those of a ``store`` entry whose
        input files changed since it was cached).
    """
    from slice2vol.cache import FeatureStore

    if entry.store:
        path = Path(expand(entry.store, base))
        store = FeatureStore(path, mode="r")
        if not store.exists():
            raise FileNotFoundError(f"{path}: slice-feature store of encoder {entry.name!r} not found")
        have = set(store.subjects())
        changed = changed_inputs(store, path, cohort)
        for line in changed.values():
            log.warning("%s", line)
        missing = [f"{s}: not in the store {path}" for s in cohort.ids if s not in have]
        return path, missing + list(changed.values()), set(changed)
    try:
        from slice2vol.extract import cache_cohort
    except ImportError as err:
        raise IntegrationError(f"2D encoders need slice2vol.extract ({err})") from None
    weights = resolve_weights(entry.weights, base)
    path = store_path(store_dir, entry, weights, cfg)
    done = set(FeatureStore(path, mode="r").subjects()) if FeatureStore(path, mode="r").exists() else set()
    todo = [s for s in cohort.ids if s not in done]
    failures: list[str] = []
    if todo:
        log.info("%s: caching %d subject(s) into %s", entry.name, len(todo), path)
        report = cache_cohort(cohort, entry.key, path, weights=weights, encoder_kwargs=dict(entry.kwargs),
                              volume_cfg=cfg.volume, slice_cfg=cfg.slices, batch_size=entry.batch_size,
                              device=cfg.device, save_tokens=entry.save_tokens, progress=progress, seed=cfg.seed,
                              dtype=entry.dtype)
        failures += [str(f) for f in getattr(report, "failures", [])]
    return path, failures, set()


def build_2d_sets(cfg: ExperimentConfig, cohort, base: Path, store_dir: Path, progress: bool,
                  timings: dict, cache=None) -> tuple[dict[str, EmbeddingSet], list[str]]:
    """Caches slice features and aggregates them, for every 2D entry; returns sets and failures.

    Parameter-free aggregators are computed once into the store. Trainable ones become
    :class:`~slice2vol.eval.nested.FoldFittedAggregator` sets, fitted per training fold later, unless
    their parameters name ``train_ids`` (then fitted once on those subjects, and disclosed).
    """
    try:
        from slice2vol.aggregate import aggregate_store
        from slice2vol.aggregate.store import aggregate_embeddings
        from slice2vol.cache import FeatureStore, StaleEmbeddings, StoreCorrupt
    except ImportError as err:
        raise IntegrationError(f"2D encoders need slice2vol.cache and slice2vol.aggregate ({err})") from None
    from slice2vol.eval.leakage import disclosure_from_provenance
    from slice2vol.eval.nested import FoldFittedAggregator, is_trainable

    sets: dict[str, EmbeddingSet] = {}
    failures: list[str] = []
    cohort_ids = set(cohort.ids)
    for entry in cfg.encoders:
        t0 = time.time()
        path, missing, stale = cached_store(entry, cfg, cohort, base, store_dir, progress)
        failures += missing
        timings[f"cache:{entry.name}"] = round(time.time() - t0, 2)
        store = FeatureStore(path, mode="r")
        # every subject failed: say why, not that the store is empty (or was never written)
        if not store.exists() or not store.subjects():
            raise ValueError(f"encoder {entry.name!r}: no subject of the cohort could be cached ({len(missing)} "
                             f"failed; first: {missing[0] if missing else '-'})")
        feature_set = store.feature_set
        weights = store.provenance.get("weights") if entry.store else resolve_weights(entry.weights, base)
        stored_key = store.provenance.get("encoder_key") or store.provenance.get("encoder")
        if entry.store and entry.key and stored_key and entry.key != stored_key:
            # the report would name an encoder that did not make these features
            raise ValueError(f"{path}: encoders entry {entry.name!r} says key {entry.key!r}, but the store holds "
                             f"{stored_key!r} features; drop 'key' from the entry (the store says which encoder "
                             "made it) or point 'store' at a cache of that encoder")
        key = entry.key or stored_key
        base_prov = {"store": str(path), "feature_set": feature_set, "encoder_key": key, "weights": weights,
                     "store_provenance": _short_prov(store.provenance)}
        for agg in entry.aggregators:
            t0 = time.time()
            params = dict(entry.aggregator_params.get(agg, {})) if isinstance(entry.aggregator_params, dict) else {}
            name = f"{entry.name}/{agg}"
            if is_trainable(agg, params) and "train_ids" not in params:
                ids = [s for s in store.subjects() if s in cohort_ids and s not in stale]
                sets[name] = FoldFittedAggregator(name, path, agg, {k: v for k, v in params.items() if k != "label"},
                                                  ids=ids, entry=entry, cache=cache, provenance=base_prov)
                continue
            set_name = safe_name(agg)
            names = store.volume_embedding_names()
            fresh = False
            if set_name in names:
                try:
                    ids, X, prov = store.volume_embeddings(set_name)
                    fresh = (prov.get("source_feature_set", prov.get("slice_feature_set")) == feature_set
                             and set(ids) == set(store.subjects()) and prov.get("params_requested") == params)
                    if fresh and _collapsed(store, ids, X, prov):
                        # written by a version whose GeM clamp flattened tiny features: aggregated again
                        log.warning("%s: the stored %s set gives every subject the same embedding although the "
                                    "slice features differ; aggregating again", entry.name, agg)
                        fresh = False
                except (StoreCorrupt, StaleEmbeddings) as err:  # derived data: aggregated again from the slices
                    log.warning("%s; aggregating again", err)
            computed = None
            if not fresh:
                log.info("%s: aggregating with %s", entry.name, agg)
                damaged: list[str] = []  # subjects whose slice rows fail their checksum: left out, reported
                if store.write_problem() is None:
                    written = aggregate_store(path, agg, name=set_name, plot=False, damaged=damaged, **params)
                    if written != set_name:
                        set_name = written
                    _annotate(path, set_name, params)
                    store = FeatureStore(path, mode="r")
                else:
                    # a shared or read-only store (entry `store:`): the set is computed for this run only
                    log.info("%s: %s is not writable: the %s set is kept in this run only", entry.name, path, agg)
                    _, ids, X, prov = aggregate_embeddings(path, agg, name=set_name, plot=False, damaged=damaged,
                                                           out_dir=store_dir / "aggregate" / safe_name(name),
                                                           **params)
                    computed = (ids, X, {**prov, "params_requested": params})
                failures += [m for m in damaged if m not in failures]
            ids, X, prov = computed or store.volume_embeddings(set_name)
            if stale:  # rows of an old scan: the subject is a failure, not scored with them
                keep = [i for i, s in enumerate(ids) if s not in stale]
                ids, X = [ids[i] for i in keep], X[keep]
            timings[f"aggregate:{name}"] = round(time.time() - t0, 2)
            check_degenerate(name, X, store=store, ids=ids, provenance=prov)
            fitted, pretraining, fit_subjects = disclosure_from_provenance(prov)
            sets[name] = EmbeddingSet(name, list(ids), X, {**prov, **base_prov}, "2d", entry, fitted=fitted,
                                      pretraining=pretraining, fit_subjects=fit_subjects)
    return sets, failures


def _collapsed(store, ids, X: np.ndarray, prov: Mapping) -> bool:
    """Every row of X is the same although the subjects' slice features differ."""
    from slice2vol.aggregate.store import slice_features_vary

    if len(X) < 2 or float(np.abs(X - X[0]).max()) != 0.0:
        return False
    return slice_features_vary(store, ids, prov.get("source_planes") or prov.get("planes"))


def check_degenerate(name: str, X: np.ndarray, *, store=None, ids: Sequence[str] | None = None,
                     provenance: Mapping | None = None) -> None:
    """Refuses embeddings that are identical for every subject (nothing to evaluate).

    Given the store the set was aggregated from (with the rows' subject ``ids`` and the set's
    ``provenance``), the message says whether the slice features are constant too (the encoder's
    doing) or differ (the aggregator collapsed them).
    """
    from slice2vol.aggregate.store import collapsed

    if len(X) < 2 or not collapsed(X):
        return
    scale = float(np.abs(X).max())
    if store is not None and ids is not None and _collapsed(store, ids, X, provenance or {}):
        prov = provenance or {}
        raise ValueError(
            f"{name}: every subject has the same embedding (max |x| = {scale:.3g}) although their cached slice "
            f"features differ: the aggregator {prov.get('aggregator', name)!r} (params {prov.get('params', {})}) "
            "collapsed them; check its parameters against the scale of the features")
    raise ValueError(
        f"{name}: every subject has the same embedding (max |x| = {scale:.3g}); the encoder "
        "output is constant or underflowed (e.g. random-init BatchNorm nets give ~1e-8 activations, which "
        "float16 stores round to 0: set dtype: float32 for that encoder entry)")


def _annotate(path: Path, name: str, params: dict) -> None:
    """Rewrites the set with the requested parameters in its provenance (for the freshness check)."""
    from slice2vol.cache import FeatureStore

    ids, X, prov = FeatureStore(path).volume_embeddings(name)
    if prov.get("params_requested") != params:  # a store opened for writing only when it is written
        FeatureStore(path, mode="a").write_volume_embeddings(name, ids, X, {**prov, "params_requested": params})


def _short_prov(prov: Mapping) -> dict:
    keep = ("encoder", "encoder_key", "weights", "weights_sha256", "state_sha256", "model_state_sha256",
            "volume_cfg", "slice_cfg", "encoder_info", "feature_set", "dtype")
    return {k: prov[k] for k in keep if k in prov} or dict(list(prov.items())[:12])

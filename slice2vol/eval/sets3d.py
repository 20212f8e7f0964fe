"""Stage 2 (continued): volume-embedding sets of native-3D encoders.

Three kinds of entry (:class:`~slice2vol.eval.experiment.Encoder3DEntry`):

* ``key``: a registered 3D network (:mod:`slice2vol.encoders3d`, ``build_encoder3d`` /
  ``embed_cohort3d``), with its own weights;
* ``checkpoint``: an SSL run's checkpoint;
* ``ssl``: a label-free SSL pretraining run at the configured scale. ``pretrain_on`` says on whom:
  the whole ``cohort`` (test subjects' images included; disclosed per set), another ``manifest``,
  or ``training_folds`` (refitted on each training fold by :class:`FoldPretrainedSSL`, so no test
  image is ever seen). Checkpoint folders are keyed by the SSL config AND the pretraining subjects,
  so another cohort in the same ``--out`` never resumes an old model.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from slice2vol.config import config_hash, from_dict
from slice2vol.eval.cohort import safe_name
from slice2vol.eval.experiment import Encoder3DEntry, ExperimentConfig, IntegrationError, expand, resolve_weights
from slice2vol.eval.nested import FoldFittedSet
from slice2vol.eval.sets import EmbeddingSet, weights_identity

log = logging.getLogger(__name__)


def _ssl_modules():
    try:
        from slice2vol.ssl import export as ssl_export
        from slice2vol.ssl.config import SSLConfig
    except ImportError as err:
        raise IntegrationError(f"3D SSL entries need slice2vol.ssl ({err}); remove them from encoders3d") from None
    return ssl_export, SSLConfig


def _ids_hash(ids) -> str:
    return hashlib.sha256("\n".join(sorted(map(str, ids))).encode()).hexdigest()[:10]


def pretrain_ssl(entry: Encoder3DEntry, cohort, subject_ids: list[str], out: Path, progress: bool):
    """Pretrains (or resumes) ``entry.ssl`` on ``subject_ids`` of ``cohort``; returns (encoder, run folder).

    The run folder is ``<out>/ssl/<name>-<hash of the config>-<hash of the subjects>``.
    """
    ssl_export, SSLConfig = _ssl_modules()
    ssl_cfg = from_dict(SSLConfig, dict(entry.ssl), f"encoders3d.{entry.name}.ssl")
    run_dir = out / "ssl" / f"{safe_name(entry.name)}-{config_hash(entry.ssl)}-{_ids_hash(subject_ids)}"
    last = run_dir / "last"
    if not last.exists():
        try:
            from slice2vol.ssl.trainer import pretrain
        except ImportError as err:
            raise IntegrationError(f"3D pretraining needs slice2vol.ssl.trainer ({err})") from None
        log.info("%s: pretraining %s on %d subjects into %s", entry.name, ssl_cfg.method, len(subject_ids), run_dir)
        pretrain(ssl_cfg, run_dir, cohort=cohort.subset(list(subject_ids)), progress=progress)
    return ssl_export.load_encoder(last), run_dir


def _embed_ssl(model, cohort, ids: list[str], store: Path, set_name: str, input_size, progress: bool):
    from slice2vol.cache import FeatureStore

    ssl_export, _ = _ssl_modules()
    fs = FeatureStore(store, mode="r")
    if not (fs.exists() and set_name in fs.volume_embedding_names()
            and set(ids) <= set(fs.volume_embeddings(set_name)[0])):
        ssl_export.embed_cohort(model, cohort.subset(ids), store, set_name, input_size=tuple(input_size),
                                progress=progress)
    got_ids, X, prov = FeatureStore(store, mode="r").volume_embeddings(set_name)
    pos = {s: i for i, s in enumerate(got_ids)}
    return X[[pos[s] for s in ids]], prov


class FoldPretrainedSSL(FoldFittedSet):
    """A 3D SSL encoder pretrained (label-free) on each training fold, embedding that fold's subjects."""

    def __init__(self, entry: Encoder3DEntry, cohort, out: Path, progress: bool, cache=None) -> None:
        super().__init__(entry.name, list(cohort.ids), kind="3d", entry=entry, cache=cache, supervised=False,
                         what=f"3D SSL ({entry.ssl.get('method', 'ssl')}) pretrained on each training fold, no labels")
        self.cohort, self.out, self.progress = cohort, out, progress

    def identity_parts(self) -> dict:
        return {"ssl": self.entry.ssl, "input_size": list(self.entry.input_size)}

    def fit_embed(self, train_ids, y_train, test_ids, kind, seed, label=None):
        model, run_dir = pretrain_ssl(self.entry, self.cohort, train_ids, self.out, self.progress)
        x_train, _ = _embed_ssl(model, self.cohort, train_ids, run_dir / "embeddings.h5", "train",
                                self.entry.input_size, self.progress)
        x_test, _ = _embed_ssl(model, self.cohort, test_ids, run_dir / "embeddings.h5", "test",
                               self.entry.input_size, self.progress)
        return x_train.astype(np.float32), x_test.astype(np.float32)


def _registry_set(entry: Encoder3DEntry, cfg: ExperimentConfig, cohort, base: Path, store_dir: Path,
                  progress: bool) -> tuple[EmbeddingSet, Any, list[str]]:
    """A registered 3D network (enc3d's ``slice2vol.encoders3d``) embedding every subject once."""
    try:
        from slice2vol.encoders3d import build_encoder3d, embed_cohort3d
    except ImportError as err:
        raise IntegrationError(f"encoders3d entry {entry.name!r} (key {entry.key!r}) needs slice2vol.encoders3d "
                               f"({err})") from None
    from slice2vol.cache import FeatureStore

    weights = resolve_weights(entry.weights, base)
    ident = config_hash({"key": entry.key, "weights": weights_identity(weights), "kwargs": entry.kwargs,
                         "sliding_window": entry.sliding_window, "ids": cohort.ids})
    path = store_dir / f"{safe_name(entry.name)}-{ident}.h5"
    set_name = safe_name(entry.name)
    failures: list[str] = []
    enc = None
    store = FeatureStore(path, mode="r")
    if not (store.exists() and set_name in store.volume_embedding_names()):
        # built only when something is to be embedded: a rerun reads the store and loads no network
        enc = build_encoder3d(entry.key, weights=weights, **entry.kwargs).to(cfg.device)
        report = embed_cohort3d(enc, cohort, path, set_name, progress=progress, sliding_window=entry.sliding_window)
        failures = [str(f) for f in getattr(report, "failures", [])]
    ids, X, prov = FeatureStore(path, mode="r").volume_embeddings(set_name)
    if enc is None:  # a rerun reads the stored set: its failures are reported again, as on the first run
        failures = [str(f) for f in prov.get("failures", []) or []]
    info = enc.info.to_dict() if enc is not None and hasattr(enc.info, "to_dict") else {}
    prov = {**prov, "store": str(path), "encoder_key": entry.key, "weights": weights,
            "weights_sha256": prov.get("weights_sha256") or info.get("weights_sha256")}
    return EmbeddingSet(entry.name, list(ids), X, prov, "3d", entry), enc, failures


def weights3d_missing(entry: Encoder3DEntry, base: Path) -> str | None:
    """Why an optional registered 3D network cannot be built here (its weights or the package that
    ships them are absent), or None when it can. Only ``key`` entries are checked; building the
    network is the check (about a second), because only the family knows where its weights live."""
    if not entry.key:
        return None
    try:
        from slice2vol.encoders3d import build_encoder3d
    except ImportError as err:
        return f"slice2vol.encoders3d unavailable ({err})"
    from slice2vol.encoders.base import WeightsUnavailable

    try:
        build_encoder3d(entry.key, weights=resolve_weights(entry.weights, base), **entry.kwargs)
    except (WeightsUnavailable, FileNotFoundError, ImportError) as err:
        return str(err).splitlines()[0]
    return None


def build_3d_sets(cfg: ExperimentConfig, cohort, manifest: Path, base: Path, store_dir: Path, out: Path,
                  progress: bool, timings: dict, cache=None) -> tuple[dict[str, EmbeddingSet], dict[str, Any], list[str]]:
    """Every native-3D entry -> an embedding set (+ the module the anomaly task re-embeds volumes with).

    Returns:
        (sets, name -> 3D module or None, failures).
    """
    sets: dict[str, EmbeddingSet] = {}
    models: dict[str, Any] = {}
    failures: list[str] = []
    for entry in cfg.encoders3d:
        t0 = time.time()
        if entry.key:
            sets[entry.name], _, fails = _registry_set(entry, cfg, cohort, base, store_dir, progress)
            models[entry.name] = None  # the anomaly task re-embeds with SSL modules only (for now)
            failures += fails
        elif entry.ssl and entry.pretrain_on == "training_folds" and not entry.checkpoint:
            sets[entry.name] = FoldPretrainedSSL(entry, cohort, out, progress, cache)
            models[entry.name] = None  # one model per fold: nothing to re-embed lesioned volumes with
        else:
            sets[entry.name], models[entry.name] = _static_ssl_set(entry, cohort, manifest, base, store_dir, out,
                                                                  progress)
        timings[f"3d:{entry.name}"] = round(time.time() - t0, 2)
    return sets, models, failures


def _static_ssl_set(entry: Encoder3DEntry, cohort, manifest: Path, base: Path, store_dir: Path, out: Path,
                    progress: bool) -> tuple[EmbeddingSet, Any]:
    """An SSL checkpoint, or one pretraining run on the cohort or on another manifest, embedding every subject."""
    ssl_export, _ = _ssl_modules()
    pretrain_ids: list[str] | None = None
    source = None
    if entry.checkpoint:
        model = ssl_export.load_encoder(expand(entry.checkpoint, base))
        ident = {"checkpoint": weights_identity(str(Path(expand(entry.checkpoint, base)) / "encoder.safetensors"))
                 if Path(expand(entry.checkpoint, base)).is_dir() else expand(entry.checkpoint, base)}
    else:
        if entry.pretrain_on == "manifest":
            from slice2vol.data.manifest import load_manifest

            other_path = Path(expand(entry.pretrain_manifest, base))
            other = load_manifest(other_path)
            pretrain_ids, source = list(other.ids), f"manifest {other_path.name}"
            model, run_dir = pretrain_ssl(entry, other, pretrain_ids, out, progress)
        else:
            pretrain_ids, source = list(cohort.ids), "this cohort, all subjects (images only)"
            model, run_dir = pretrain_ssl(entry, cohort, pretrain_ids, out, progress)
        ident = {"run": run_dir.name}
    ident.update({"input_size": list(entry.input_size), "ids": cohort.ids})
    path = store_dir / f"{safe_name(entry.name)}-{config_hash(ident)}.h5"
    X, prov = _embed_ssl(model, cohort, list(cohort.ids), path, safe_name(entry.name), entry.input_size, progress)
    es = EmbeddingSet(entry.name, list(cohort.ids), X, {**prov, "store": str(path)}, "3d", entry)
    if pretrain_ids is not None:
        es.fit_subjects = pretrain_ids
        es.pretraining = {"n_subjects": len(set(pretrain_ids)), "labels": False, "source": source}
    return es, model

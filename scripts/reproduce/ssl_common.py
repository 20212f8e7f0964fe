"""Shared steps of the scripts that regenerate the tables of docs/ssl.md (``scripts/reproduce/ssl_*.py``).

Every number those scripts print comes from the project's own code paths: ``pretrain`` (streaming,
checkpoints kept every ``keep_every`` steps), :func:`slice2vol.ssl.export.embed_cohort` (whole-head
embedding, as ``slice2vol bench`` embeds 3D sets), and the benchmark's probe tasks through
:func:`slice2vol.eval.runner.evaluate_sets` (subject-level stratified 5-fold CV, repeated; ROC AUC
as the mean over test folds, MAE pooled; subject-level bootstrap 95% intervals; paired bootstrap
intervals and permutation p-values against a reference set, Holm-adjusted per table).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

DEFAULT_MANIFEST = os.environ.get("SLICE2VOL_IXI", str(REPO.parent / "shared" / "data" / "ixi-hh-2mm"))


def load_cohort(manifest: str | None = None):
    """The dev cohort (``participants.csv`` of ``$SLICE2VOL_IXI`` or ``../shared/data/ixi-hh-2mm``) or a manifest."""
    from slice2vol.data.manifest import load_manifest

    path = Path(manifest or DEFAULT_MANIFEST)
    if path.is_dir():
        path = path / "participants.csv"
    if not path.exists():
        raise SystemExit(f"{path}: no manifest (set SLICE2VOL_IXI or pass --manifest)")
    return load_manifest(path)


def train(config: str | Path, out: Path, cohort, overrides: Sequence[str] = ()):
    """Pretrains (or resumes) a run; returns its :class:`~slice2vol.ssl.trainer.TrainResult`."""
    from slice2vol.config import load_config
    from slice2vol.ssl import SSLConfig
    from slice2vol.ssl.trainer import pretrain

    cfg = load_config(SSLConfig, config, list(overrides))
    return cfg, pretrain(cfg, out, cohort=cohort, progress=False)


def embed_checkpoints(run_dir: Path, cohort, input_size: Sequence[int], store: Path,
                      include_init: bool = True) -> dict[int, tuple[list[str], np.ndarray, dict]]:
    """step -> (ids, X, provenance) for every kept checkpoint (and the initialisation), embedded whole-head."""
    from slice2vol.cache import FeatureStore
    from slice2vol.eval.tasks.ssl_curve import _init_encoder
    from slice2vol.ssl.export import embed_cohort, list_checkpoints, load_encoder

    points = list(list_checkpoints(run_dir))
    if include_init and all(s != 0 for s, _ in points):
        points.insert(0, (0, None))
    out = {}
    for step, ckpt in points:
        encoder = _init_encoder(run_dir) if ckpt is None else load_encoder(ckpt)
        name = f"{run_dir.name}/step_{step:07d}"
        fs = FeatureStore(store, mode="r")
        sha = encoder.slice2vol_meta.get("weights_sha256")
        if not (fs.segment_paths() and name in fs.volume_embedding_names()
                and fs.volume_embeddings(name)[2].get("weights_sha256") == sha):
            embed_cohort(encoder, cohort, store, name, input_size=tuple(input_size), progress=False, write_labels=False)
        out[step] = FeatureStore(store, mode="r").volume_embeddings(name)
    return out


def intensity_baseline(cohort, volume_size: Sequence[int], grid: int = 8) -> tuple[list[str], np.ndarray]:
    """The down-sampled-intensity baseline: the head (cropped to its box, fitted into ``volume_size`` like
    the SSL input) average-pooled to ``grid``^3 raw intensities (512 for grid 8)."""
    import torch
    import torch.nn.functional as F

    from slice2vol.data.io import VolumeConfig
    from slice2vol.ssl.data import VolumeBank

    bank = VolumeBank.from_cohort(cohort, VolumeConfig(crop_foreground=True), tuple(volume_size), progress=False)
    images = torch.stack(bank.images).float()
    pooled = F.adaptive_avg_pool3d(images, grid)
    return list(bank.ids), pooled.flatten(1).numpy()


def evaluate(sets: dict[str, tuple[list[str], np.ndarray]], cohort, reference: str, out: Path, *,
             n_repeats: int = 5, seed: int = 0, labels: Sequence[str] = ("sex", "age")) -> dict:
    """The benchmark's k-NN and linear probe tasks on ready embeddings; returns evaluate_sets' dict."""
    from slice2vol.eval.experiment import ExperimentConfig
    from slice2vol.eval.resultcache import ResultCache
    from slice2vol.eval.runner import evaluate_sets
    from slice2vol.eval.sets import EmbeddingSet
    from slice2vol.eval.splits import SplitConfig

    cfg = ExperimentConfig(tasks=["knn", "linear"], reference=reference, seed=seed,
                           splits=SplitConfig(n_folds=5, n_repeats=n_repeats, seed=seed, n_bins=4))
    cfg.knn.ks = (10,)
    cfg.primary_k = 10
    objs = {name: EmbeddingSet(name, list(ids), np.asarray(X, dtype=np.float64), {}, "3d")
            for name, (ids, X) in sets.items()}
    types = {k: v for k, v in cohort.label_types.items() if k in labels}
    return evaluate_sets(objs, cohort.labels(), types, cfg, out / "splits", ResultCache(out / "cache"),
                         tasks=["knn", "linear"], out=out)


def row(results: dict, encoder: str, label: str, task: str, metric: str) -> dict | None:
    """The primary-variant row of one set / label / probe."""
    variant = {"linear": {"roc_auc": "logistic", "mae": "ridge"}, "knn": {"roc_auc": "k=10 weighted",
                                                                           "mae": "k=10 weighted"}}[task][metric]
    return next((r for r in results["rows"] if (r["encoder"], r["label"], r["task"], r["variant"], r["metric"])
                 == (encoder, label, task, variant, metric)), None)


def paired(results: dict, encoder: str, label: str, task: str, metric: str) -> dict | None:
    return next((p for p in results["paired"] if (p["encoder"], p["label"], p["task"], p["metric"])
                 == (encoder, label, task, metric)), None)


def fmt_ci(r: dict | None, digits: int = 2) -> str:
    if r is None or r.get("estimate") is None or math.isnan(r["estimate"]):
        return "-"
    return f"{r['estimate']:.{digits}f} [{r['ci_low']:.{digits}f}, {r['ci_high']:.{digits}f}]"


def fmt_delta(p: dict | None, digits: int = 2) -> str:
    if p is None:
        return "-"
    return f"{p['delta']:+.{digits}f} [{p['ci_low']:+.{digits}f}, {p['ci_high']:+.{digits}f}], p_holm {p['p_holm']:.3f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_block(docs: Path, name: str, text: str) -> None:
    """Replaces the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in ``docs``."""
    content = docs.read_text()
    # the block may be empty (BEGIN and END on consecutive lines)
    pattern = re.compile(rf"(<!-- BEGIN {re.escape(name)} -->\n)(?:.*?\n)?(<!-- END {re.escape(name)} -->)", re.S)
    if not pattern.search(content):
        raise SystemExit(f"{docs}: no '<!-- BEGIN {name} -->' ... '<!-- END {name} -->' block to replace")
    docs.write_text(pattern.sub(lambda m: m.group(1) + text.strip() + "\n" + m.group(2), content))


def publish(tables: dict[str, str], docs: str | Path | None) -> None:
    """Prints each table under its block name and, with ``docs``, writes it into that block."""
    for name, text in tables.items():
        print(f"\n## {name}\n\n{text}")
        if docs:
            write_block(Path(docs), name, text)


def save_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))


def stamp() -> str:
    return time.strftime("%Y-%m-%d")

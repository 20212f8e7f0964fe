"""The experiment runner: one YAML file -> embedding sets, every task, the ``results`` dict, the report.

The runner only orchestrates; each stage lives in its own module:

1. cohort and labels (:mod:`slice2vol.eval.cohort`): a manifest, or the synthetic cohort built once;
2. embedding sets (:mod:`slice2vol.eval.sets`): per 2D encoder entry, slice features cached into a
   store and aggregated; per 3D entry, a checkpoint or a short SSL run embedded into its own store;
3. the shared subject-level splits of every label (``<out>/splits/<label>.json``);
4. tasks (:mod:`slice2vol.eval.tasks`): each registered task named in ``tasks`` runs on the same
   context and returns rows, paired tests and figures; Holm-adjusted p-values per table;
5. figures of the probe tasks (:mod:`slice2vol.eval.figures`) and the report
   (:func:`slice2vol.eval.report.write_report`) from the ``results`` dict (schema
   ``slice2vol.results/2``).

Task results are cached in ``<out>/cache`` (JSON + npz, :mod:`slice2vol.eval.resultcache`) under
content keys, so a rerun with everything in place only re-renders the report.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import inspect
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from slice2vol.config import to_dict
from slice2vol.eval.cohort import labels_of, make_label_splits, resolve_cohort
from slice2vol.eval.estimates import add_holm, primary_metric, summary
from slice2vol.eval.experiment import (CohortSection, Encoder2DEntry, Encoder3DEntry, ExperimentConfig,  # noqa: F401
                                       IntegrationError, expand, load_experiment, repo_root_of)
from slice2vol.eval.leakage import check_leakage, describe, same_scans, tested_subjects
from slice2vol.eval.resultcache import ResultCache, code_version
from slice2vol.eval.sets import EmbeddingSet, build_2d_sets, weights_file_missing  # noqa: F401
from slice2vol.eval.tasks import get_task
from slice2vol.eval.tasks.base import TaskContext

log = logging.getLogger(__name__)

SCHEMA = "slice2vol.results/2"


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _git_commit(base: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(base), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _versions() -> dict:
    try:
        from slice2vol.cache import library_versions

        versions = library_versions()
    except ImportError:  # pragma: no cover
        import platform

        versions = {"python": platform.python_version()}
    import slice2vol

    return {"slice2vol": slice2vol.__version__, "eval_code": code_version(), **versions}


def _set_entry(es: EmbeddingSet) -> dict:
    """The disclosure of one set in ``results["sets"]``."""
    prov = es.provenance or {}
    entry = {"kind": es.kind, "n": len(es.ids), "dim": es.dim, "fitted": es.fitted, "pretraining": es.pretraining}
    key = getattr(es.entry, "key", None) or prov.get("encoder_key")
    if key:
        entry["encoder_key"] = key
    if prov.get("weights"):
        entry["weights"] = prov["weights"]
    sha = prov.get("weights_sha256") or (prov.get("store_provenance") or {}).get("weights_sha256")
    if sha:
        entry["weights_sha256"] = sha
    note = prov.get("baseline") or prov.get("chance") or (f"brought in from {Path(prov['source']).name} "
                                                           f"({prov.get('n_columns')} columns)" if prov.get("source") else None)
    if note:
        entry["note"] = note
    return entry


def build_sets(cfg: ExperimentConfig, cohort, manifest: Path, base: Path, out: Path, cache: ResultCache,
               progress: bool, timings: dict) -> tuple[dict, dict, list[str], list[dict]]:
    """Every embedding set of the experiment: 2D entries, 3D entries, fine-tuning entries, brought-in
    features, computed baselines and chance -> (sets, 3D modules, failures, skipped entries)."""
    from slice2vol.eval.baselines import chance_set, compute_baselines, read_features
    from slice2vol.eval.finetuned import FoldFinetunedEncoder
    from slice2vol.eval.sets3d import build_3d_sets

    # brought-in tables first: a bad one is refused in seconds, not after hours of caching
    labels, label_types = labels_of(cohort, cfg)
    brought = {entry.name: read_features(entry, Path(expand(entry.path, base)), list(cohort.ids),
                                         labels[list(label_types)])
               for entry in cfg.features}
    store_dir = Path(expand(cfg.store_dir, base)) if cfg.store_dir else out / "stores"
    store_dir.mkdir(parents=True, exist_ok=True)
    skipped: list[dict] = []
    sets, failures = build_2d_sets(cfg, cohort, base, store_dir, progress, timings, cache) if cfg.encoders else ({}, [])
    sets3d, models3d, fails3d = build_3d_sets(cfg, cohort, manifest, base, store_dir, out, progress, timings, cache)
    sets.update(sets3d)
    failures += fails3d
    for entry in cfg.finetune:
        es = FoldFinetunedEncoder(entry, cfg, cohort, base, out, progress, cache)
        sets[es.name] = es
    for name, es in brought.items():
        sets[name] = es
        missing = es.provenance.get("missing_columns") or {}
        if missing:  # these subjects then drop out of every set's comparison (labels use common subjects)
            skipped.append({"name": f"{name}: {len(missing)} subject(s) {list(missing)[:5]}",
                            "reason": "missing or non-finite values in the features file", "substitute": None})
            # failures, not a warning alone: the whole comparison shrank (exit 1, listed at the end)
            failures += [f"{sid}: {es.provenance['source']}: no finite value in column(s) {cols} of features entry "
                         f"{name!r}; left out of every set's comparison" for sid, cols in missing.items()]
        no_row = es.provenance.get("left_out_no_row") or []
        if no_row:  # the same for subjects the table does not cover
            skipped.append({"name": f"{name}: {len(no_row)} subject(s) {no_row[:5]}",
                            "reason": "no row in the features file", "substitute": None})
            failures += [f"{sid}: {es.provenance['source']}: no row for this subject in features entry {name!r}; "
                         "left out of every set's comparison" for sid in no_row]
    if cfg.baselines.sets:
        computed, missed = compute_baselines(list(cfg.baselines.sets), cohort, cfg.volume, cfg.baselines, cache,
                                             progress, timings, failures=failures)
        sets.update(computed)
        skipped += missed
    if cfg.baselines.chance and sets:
        sets["chance"] = chance_set(list(cohort.ids))
    return sets, models3d, list(dict.fromkeys(failures)), skipped  # a subject failing for 2D and 3D: once


def _legacy_report(write_report, out: Path, results: dict) -> dict:
    """The report through the keyword API of the old ``write_report`` (until the results-dict API lands)."""
    rows = [{**r, "point": r["pooled"], "mean": r["fold_mean"], "sd": r["fold_sd"]} for r in results["rows"]]
    figures = [(f["caption"], out / f["png"]) for f in results["figures"]]
    extra = {k: results[k] for k in ("schema", "summary", "sets", "skipped", "cohort", "reference", "tasks")}
    return write_report(out, title=results["title"], rows=rows, paired=results["paired"], figures=figures,
                        config=results["config"], provenance=results["provenance"], notes=results["notes"],
                        extra=extra)


def _chance_note(frames: Mapping) -> str:
    """What the ``chance`` row is, and the majority-class accuracy it is not (a stratified guess on a
    70/30 label scores accuracy 0.58; always answering the larger class scores 0.70)."""
    shares = []
    for label, fr in frames.items():
        if fr.kind == "categorical" and len(fr.y):
            values, counts = np.unique(np.asarray(fr.y), return_counts=True)
            shares.append(f"{label} {counts.max() / counts.sum():.3f} ('{values[counts.argmax()]}')")
    return ("Chance row: a stratified dummy (classes drawn with the training fold's frequencies) and the training "
            "mean (continuous labels). Always answering the majority class would score accuracy "
            + (", ".join(shares) if shares else "–") + " (balanced accuracy and ROC AUC 0.5): read an encoder's "
            "accuracy against that, or use balanced accuracy.")


def _notes(cfg: ExperimentConfig, n: int, manifest, label_types, reference, skipped, set_entries,
           frames: Mapping | None = None) -> list[str]:
    notes = [
        f"Cohort: {n} subjects ({manifest}). Labels: " + ", ".join(f"{k} ({v})" for k, v in label_types.items()) + ".",
        f"Protocol: subject-level {cfg.splits.n_folds}-fold cross-validation x {cfg.splits.n_repeats} repeat(s) "
        f"(seed {cfg.splits.seed}), stratified by class or by {cfg.splits.n_bins} quantile bins"
        + (f", grouped by {cfg.splits.group}" if cfg.splits.group else "") + "; the same saved splits for every set. "
        "k-NN: " + ("features centred with the training-fold mean, " if cfg.knn.center else "")
        + f"L2-normalised cosine, temperature-weighted (T = {cfg.knn.temperature}) and majority votes; linear: "
        "L2 logistic / ridge, penalty chosen on inner folds of the training fold, standardised inside it.",
        "Estimates: ROC AUC is reported as the mean over test folds (pooling ranks across folds biases weak "
        "models low); subject averages (accuracy, MAE, ...) as the pooled out-of-fold value. Each row carries "
        "both; intervals are subject-level bootstrap 95% intervals of the headline estimator. p_holm: "
        "Holm-adjusted over the comparisons of one table.",
        f"Reference set for paired tests: {reference}.",
    ]
    if cfg.baselines.chance and frames:
        notes.append(_chance_note(frames))
    notes += [line for name, entry in set_entries.items() if (line := describe(name, entry))]
    notes += [f"Skipped: {s['name']}: {s['reason']}" + (f" (substitute: {s['substitute']})" if s.get("substitute")
                                                       else "") for s in skipped]
    return notes


def evaluate_sets(sets: Mapping[str, EmbeddingSet], labels, label_types: Mapping[str, str], cfg: ExperimentConfig,
                  split_dir: Path, cache: ResultCache | None = None, *, tasks: list[str] | None = None,
                  out: Path | None = None) -> dict:
    """The probe tasks (default: those of ``cfg.tasks`` among knn/linear) on ready embedding sets.

    Args:
        sets: name -> :class:`EmbeddingSet` (rows are subjects).
        labels: DataFrame indexed by subject ID; label_types: label -> categorical/continuous.
        split_dir: where ``<label>.json`` splits are saved and reused.

    Returns:
        ``{"rows", "paired" (Holm-adjusted), "frames" (label -> LabelSplits), "skipped", "reference"}``.
    """
    names = list(sets)
    reference = cfg.reference if cfg.reference in sets else (names[0] if names else None)
    frames = make_label_splits(labels, label_types, [set(es.ids) for es in sets.values()], cfg, Path(split_dir))
    ctx = TaskContext(cfg=cfg, base=Path.cwd(), out=Path(out or split_dir), labels=labels, label_types=label_types,
                      frames=frames, sets=sets, reference=reference, cache=cache, progress=False)
    rows, paired, skipped = [], [], []
    for name in tasks or [t for t in cfg.tasks if t in ("knn", "linear")]:
        res = get_task(name).run(ctx)
        rows, paired, skipped = rows + res.rows, paired + res.paired, skipped + res.skipped
    return {"rows": rows, "paired": add_holm(paired), "frames": frames, "skipped": skipped, "reference": reference}


def _leave_out_same_scans(sets: Mapping[str, EmbeddingSet], cohort, labels, failures: list[str]):
    """(cohort, labels, groups) without the subjects that are one scan under two IDs (see
    :func:`~slice2vol.eval.leakage.same_scans`): they would sit on both sides of a subject-level
    split, so each gets a failure line naming its image and the other IDs, and none is evaluated."""
    twins, notes = same_scans(sets)
    for note in notes:
        log.warning("%s", note)
    if not twins:
        return cohort, labels, []
    by_id = {s.subject_id: s for s in cohort.subjects}

    def image(sid: str) -> str:
        subject = by_id.get(sid)
        return str(next(iter(subject.images.values()))) if subject is not None and subject.images else sid

    for group in twins:
        for sid in group:
            others = ", ".join(f"{o!r} ({image(o)})" for o in group if o != sid)
            failures.append(f"{sid}: {image(sid)}: the same scan as subject(s) {others}: their embeddings coincide "
                            "in every image set (saved twice under two IDs?); all left out of the benchmark")
    gone = {s for g in twins for s in g}
    log.warning("%d subject(s) left out as one scan under two IDs: %s", len(gone),
                "; ".join(", ".join(g) for g in twins))
    return (cohort.subset([s for s in cohort.ids if s not in gone]),
            labels.drop(index=[s for s in labels.index if str(s) in gone]), twins)


def run_experiment(cfg: ExperimentConfig, *, base: Path, out: Path, progress: bool = True,
                   config_path: str | None = None, command_line: str | None = None) -> dict:
    """Runs every stage and writes the report.

    Returns:
        ``{"paths": report files, "results": the results dict, "rows", "paired", "timings", "failures"}``.
    """
    from slice2vol.eval.figures import probe_figures
    from slice2vol.eval.report import write_report

    t_start = time.time()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = ResultCache(out / "cache")
    timings: dict[str, float] = {}
    t0 = time.time()
    cohort, manifest = resolve_cohort(cfg, base, out, config_path)
    if not len(cohort):
        # else the stages run on nobody and the first to notice blames itself (a store never written)
        raise ValueError(f"{manifest}: no subject of the manifest is left to benchmark ("
                         + ("every row failed; the failures are listed above)" if cohort.failures
                            else "it lists no subject)"))
    need = 2 * cfg.splits.n_folds
    if {"knn", "linear"} & set(cfg.tasks) and len(cohort) < need:
        # every label would be skipped after all the caching ("fewer than 2 x splits.n_folds"), exit 1
        raise ValueError(f"{manifest}: {len(cohort)} subject(s) to benchmark, but splits.n_folds={cfg.splits.n_folds} "
                         f"needs at least {need} (2 x n_folds) for the k-NN and linear probes; lower splits.n_folds or "
                         "add subjects")
    labels, label_types = labels_of(cohort, cfg)
    if "segmentation" in cfg.tasks:
        from slice2vol.eval.tasks.segmentation import structures_of

        structures_of(cfg.segmentation, base)  # overlapping structures: refused before any caching
    timings["cohort"] = round(time.time() - t0, 2)
    log.info("cohort: %d subjects from %s; labels %s", len(cohort), manifest, label_types)
    absent = [e for e in cfg.encoders if e.optional and weights_file_missing(e, base)]
    for entry in absent:
        log.warning("%s: weights %s not found; skipping this optional encoder", entry.name, expand(entry.weights, base))
    cfg = dataclasses.replace(cfg, encoders=[e for e in cfg.encoders if e not in absent])
    from slice2vol.eval.sets3d import weights3d_missing

    absent3d = [(e, why) for e in cfg.encoders3d if e.optional for why in [weights3d_missing(e, base)] if why]
    for entry, why in absent3d:
        log.warning("%s: %s; skipping this optional 3D encoder", entry.name, why)
    cfg = dataclasses.replace(cfg, encoders3d=[e for e in cfg.encoders3d if all(e is not a for a, _ in absent3d)])
    sets, models3d, failures, skipped = build_sets(cfg, cohort, manifest, base, out, cache, progress, timings)
    skipped = [{"name": e.name, "reason": f"weights file {expand(e.weights, base)} not found", "substitute": None}
               for e in absent] + [{"name": e.name, "reason": why, "substitute": None} for e, why in absent3d] + skipped
    if not sets:
        why = "; ".join(f"{e['name']}: {e['reason']}" for e in skipped)
        raise ValueError("no embedding set: list encoders, encoders3d, finetune, features or baselines in the config"
                         + (f" (skipped: {why})" if why else ""))
    cohort, labels, twins = _leave_out_same_scans(sets, cohort, labels, failures)
    names = list(sets)
    reference = cfg.reference if cfg.reference in sets else names[0]
    if cfg.reference and cfg.reference not in sets:
        log.warning("reference %r is not an embedding set (have %s); using %r", cfg.reference, names, reference)
        skipped.append({"name": f"reference {cfg.reference}", "reason": "not an embedding set of this run",
                        "substitute": reference})
    frames = make_label_splits(labels, label_types, [set(es.ids) for es in sets.values()], cfg, out / "splits",
                               skipped=skipped)
    tested = tested_subjects(frames)
    for es in sets.values():
        if es.pretraining is not None:
            es.pretraining["n_in_test_folds"] = len(set(es.fit_subjects) & tested)
    check_leakage(sets, frames)
    ctx = TaskContext(cfg=cfg, base=base, out=out, cohort=cohort, manifest=manifest, labels=labels,
                      label_types=label_types, frames=frames, sets=sets, reference=reference, models3d=models3d,
                      cache=cache, progress=progress, timings=timings)
    rows, paired, figures, extras = [], [], [], {}
    for name in cfg.tasks:
        t0 = time.time()
        res = get_task(name).run(ctx)
        timings[f"task:{name}"] = round(time.time() - t0, 2)
        rows += res.rows
        paired += res.paired
        figures += res.figures
        skipped += res.skipped
        if res.extras:
            extras[name] = res.extras
    for name, es in sets.items():
        if getattr(es, "fit_seconds", 0):
            timings[f"fold-fitting:{name}"] = round(es.fit_seconds, 2)
    add_holm(paired)
    t0 = time.time()
    figures = probe_figures(ctx, rows) + figures
    timings["figures"] = round(time.time() - t0, 2)
    primary_task = next((t for t in ("linear", "knn") if t in cfg.tasks), None)
    primary = {}
    if primary_task:
        task = get_task(primary_task)
        primary = {label: (primary_task, task.primary_variant(ctx, fr.kind), primary_metric(fr.kind))
                   for label, fr in frames.items()}
    set_entries = {n: _set_entry(es) for n, es in sets.items()}
    timings["total"] = round(time.time() - t_start, 2)
    results = {
        "schema": SCHEMA, "title": f"slice2vol benchmark: {cfg.name}", "config": to_dict(cfg),
        "notes": _notes(cfg, len(cohort), manifest, label_types, reference, skipped, set_entries, frames),
        "provenance": {"git_commit": _git_commit(base), "command_line": command_line or " ".join(
                           shlex.quote(a) for a in sys.argv), "config_file": config_path, "manifest": str(manifest),
                       "manifest_sha256": _sha256(manifest), "versions": _versions(), "started": started,
                       "timings_s": timings, "splits": {label: str(fr.path) for label, fr in frames.items()}},
        "cohort": {"n_subjects": len(cohort), "labels": dict(label_types), "same_scans": twins,
                   # the cache's report repeats the manifest's own failures: each subject once
                   "failures": list(dict.fromkeys([str(f) for f in cohort.failures] + failures))},
        "reference": reference,
        "sets": set_entries,
        "skipped": skipped,
        "summary": summary(rows, paired, primary),
        "rows": rows, "paired": paired, "figures": figures, "tasks": extras,
    }
    params = inspect.signature(write_report).parameters
    if "results" in params:
        paths = write_report(out, results)
    else:
        paths = _legacy_report(write_report, out, results)
    log.info("report: %s (%.1f s)", paths["report.html"], time.time() - t_start)
    return {"paths": paths, "results": results, "rows": rows, "paired": paired, "timings": timings,
            "failures": failures}


def __getattr__(name: str):
    # tests/eval/test_dense_and_lesions.py (probes) still imports this helper from here; it moved with
    # the segmentation task. Removed once that import points at slice2vol.eval.tasks.segmentation.
    if name == "_nearest_fill":
        from slice2vol.eval.tasks.segmentation import _nearest_fill

        return _nearest_fill
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The ``anomaly`` task: PatchCore-style detection of simulated lesions with every 2D encoder, its
random-init twin and the raw-intensity positive control; pixel, region, slice and subject levels,
the paired subject design and a contrast x radius difficulty sweep.

:func:`run_anomaly` builds the sets, runs the cross-validation
(:func:`~slice2vol.eval.dense_bench.anomaly_cv`) per set and scorer variant, and returns rows, paired
tests, figures and extras; see :mod:`slice2vol.eval.anomaly` for the scorer and
:mod:`slice2vol.eval.lesions` for the lesion simulation.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from slice2vol.config import to_dict
from slice2vol.eval.dense_bench import ProbeSet, anomaly_cv, content_hash
from slice2vol.eval.dense_tasks import (ANOMALY_TASK, _anomaly_features, _code, _figure, _files, _folds, _gains,
                                        _loadable, _loader, _paired, _reference, _row, _scorer, comparison_pairs,
                                        extraction_levels, probe_sets)
from slice2vol.eval.estimates import add_holm
from slice2vol.eval.metrics import mean_sd
from slice2vol.eval.tasks.base import Task, TaskContext, TaskResult

log = logging.getLogger(__name__)


def run_anomaly(ctx) -> dict:
    """The anomaly task: every set x scorer variant, pixel/region/slice/subject levels, sweep."""
    from slice2vol.eval.anomaly import paired_rank_fraction
    from slice2vol.eval.lesions import describe

    cfg, ac = ctx.cfg, ctx.cfg.anomaly
    out: dict[str, Any] = {"rows": [], "paired": [], "figures": [], "extras": {}, "skipped": []}
    load = _loader(ctx)
    subjects, out["skipped"] = _loadable(list(ctx.cohort.subjects), load, ANOMALY_TASK, ac.max_subjects or None)
    if len(subjects) < 4:
        out["skipped"].append({"name": ANOMALY_TASK, "reason": f"{len(subjects)} subjects (< 4)", "substitute": None})
        return out
    ids = [s.subject_id for s in subjects]
    folds, splits = _folds(ctx, ANOMALY_TASK, ids, ac.n_folds)
    fold_of = np.zeros(len(ids), int)
    for f, (_, test) in enumerate(folds):
        fold_of[test] = f
    feat = _anomaly_features(cfg)
    sets = probe_sets(ac, cfg.encoders, ctx.base)
    variants = list(ac.variants) or ["patchcore"]
    results: dict[tuple[str, str], dict] = {}
    for pset in sets:
        t0 = time.time()
        levels = extraction_levels(cfg, pset)
        files = None
        for variant in variants:
            scorer = _scorer(ac, variant)
            score_levels = levels if pset.kind == "control" else list(scorer.levels)
            key = content_hash("anomaly", pset.identity(), to_dict(feat), to_dict(scorer), score_levels,
                               to_dict(ac.lesions), to_dict(ac.sweep) if ac.sweep else None, ac.fpr,
                               ac.min_lesion_voxels, ac.seed, ids, splits.to_dict(), to_dict(cfg.volume), cfg.seed,
                               cfg.n_bootstrap, _code())
            res = ctx.cache.get("dense-anomaly", key) if ctx.cache else None
            if res is None:
                try:
                    if files is None:
                        files = _files(ctx, pset, feat, levels)
                        failures = files.ensure(subjects, load, progress=ctx.progress)
                        if failures:
                            raise ValueError(f"dense features failed for {len(failures)} subject(s): {failures[:3]}")
                    res = anomaly_cv(files, subjects, load, folds, scorer, ac.lesions, ac.sweep, fpr=ac.fpr,
                                     min_lesion_voxels=ac.min_lesion_voxels, levels=score_levels,
                                     seed=cfg.seed * 7919 + ac.seed, n_boot=cfg.n_bootstrap, progress=ctx.progress)
                except (ValueError, RuntimeError, NotImplementedError, AttributeError, OSError) as err:
                    log.warning("anomaly: %s / %s skipped (%s)", pset.name, variant, err)
                    out["skipped"].append({"name": f"{ANOMALY_TASK}: {pset.name} ({variant})",
                                           "reason": str(err)[:300], "substitute": None})
                    continue
                if ctx.cache:
                    ctx.cache.put("dense-anomaly", key, res)
            results[(pset.name, variant)] = res
        if files is not None and not feat.keep:
            files.remove()
        ctx.timings[f"anomaly:{pset.name}"] = round(time.time() - t0, 2)
        log.info("anomaly / %s: %.1f s", pset.name, ctx.timings[f"anomaly:{pset.name}"])
    sets = [s for s in sets if any((s.name, v) in results for v in variants)]
    n_boot, n_perm, seed = cfg.n_bootstrap, cfg.n_permutations, cfg.seed
    sweep_extras: dict = {}
    for (name, variant), res in results.items():
        rows = out["rows"]
        rows.append(_row(ANOMALY_TASK, "pixel-level", name, variant, "auroc", res["pixel_auroc"], fold_of, len(folds),
                         n_boot, seed))
        pooled = res["pixel_pooled"]
        rows.append({**_row(ANOMALY_TASK, "pixel-level (pooled voxels)", name, variant, "auroc", res["pixel_auroc"],
                            fold_of, len(folds), 0, seed),
                     "estimate": pooled["estimate"], "pooled": pooled["estimate"], "ci_low": pooled["ci_low"],
                     "ci_high": pooled["ci_high"], "pooled_ci_low": pooled["ci_low"],
                     "pooled_ci_high": pooled["ci_high"], **_fold_stats(pooled.get("fold_values", []))})
        rows.append(_ratio_row(ANOMALY_TASK, f"region-level (lesions detected at {ac.fpr:.0%} voxel FPR)", name,
                               variant, "detection_rate", res["detected"], res["n_lesions"], fold_of, len(folds),
                               n_boot, seed))
        sl = res["slice"]
        rows.append(_cluster_auc_row(ANOMALY_TASK, "slice-level", name, variant, sl["truth"], sl["scores"], sl["owner"],
                                     len(ids), fold_of, len(folds), n_boot, seed))
        h, s = res["healthy"], res["lesioned"]
        rows.append(_subject_auc_row(name, variant, h, s, fold_of, len(folds), n_boot, seed))
        frac, lo, hi = paired_rank_fraction(h, s, n_boot=n_boot, seed=seed)
        rows.append({**_row(ANOMALY_TASK, "subject-level (paired: lesioned > own healthy)", name, variant,
                            "fraction", (s > h).astype(float) + 0.5 * (s == h), fold_of, len(folds), 0, seed),
                     "estimate": frac, "pooled": frac, "ci_low": lo, "ci_high": hi, "pooled_ci_low": lo,
                     "pooled_ci_high": hi})
        for setting, v in res["sweep"].items():
            sweep_extras.setdefault(name, {}).setdefault(variant, {})[setting] = {
                "pixel_auroc": mean_sd(v["pixel_auroc"])[0], "detection_rate": float(np.mean(v["detected"])),
                "per_subject_pixel_auroc": np.asarray(v["pixel_auroc"]).tolist()}
    primary = variants[0]
    reference = _reference(ctx, sets)
    for a, b in comparison_pairs(sets, reference):
        if (a, primary) in results and (b, primary) in results:
            out["paired"].append(_paired(ANOMALY_TASK, "pixel-level", primary, "auroc", a, b,
                                         results[(a, primary)]["pixel_auroc"], results[(b, primary)]["pixel_auroc"],
                                         n_boot, n_perm, seed))
    add_holm(out["paired"])  # Holm within each table (task, label, variant, metric)
    by_name = {s.name: s for s in sets}
    out["extras"] = {
        "subjects": ids, "variants": variants, "primary_variant": primary,
        "lesions": {"main": to_dict(ac.lesions), "description": describe(ac.lesions),
                    "sweep": to_dict(ac.sweep) if ac.sweep else None},
        "sets": {s.name: {"kind": s.kind, "key": s.key, "weights": s.weights_id if s.kind != "control" else None,
                          "twin": s.twin, "control": s.control} for s in sets},
        "per_subject": {f"{n}|{v}": {"pixel_auroc": r["pixel_auroc"].tolist(), "healthy": r["healthy"].tolist(),
                                     "lesioned": r["lesioned"].tolist(), "detected": r["detected"].tolist(),
                                     "n_lesions": r["n_lesions"].tolist()} for (n, v), r in results.items()},
        "sweep": sweep_extras,
        "thresholds": {f"{n}|{v}": r["thresholds"] for (n, v), r in results.items()},
        "timing_s": {f"{n}|{v}": r.get("timing_s") for (n, v), r in results.items()},
        "gains": _gains(out["paired"], by_name, primary),
    }
    out["figures"] = _anomaly_figures(ctx, out, results, sets, primary)
    return out


def _cluster_auc_row(task, label, name, variant, truth, scores, owner, n, fold_of, n_folds, n_boot, seed) -> dict:
    """AUROC of slices with a subject-cluster bootstrap (slices of one subject are not independent)."""
    from slice2vol.eval.metrics import _binary_auc

    truth, scores, owner = np.asarray(truth, bool), np.asarray(scores, float), np.asarray(owner, int)
    point = _binary_auc(truth, scores)
    members = [np.flatnonzero(owner == i) for i in range(n)]
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = np.concatenate([members[i] for i in rng.integers(0, n, n)])
        boots.append(_binary_auc(truth[idx], scores[idx]))
    b = np.asarray([v for v in boots if np.isfinite(v)])
    lo, hi = (float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))) if len(b) else (math.nan, math.nan)
    folds = [_binary_auc(truth[np.isin(owner, np.flatnonzero(fold_of == f))],
                         scores[np.isin(owner, np.flatnonzero(fold_of == f))]) for f in range(n_folds)]
    folds = [v for v in folds if np.isfinite(v)]
    return {"task": task, "label": label, "encoder": name, "variant": variant, "metric": "auroc", "estimate": point,
            "estimate_kind": "pooled", "ci_low": lo, "ci_high": hi, "pooled": point, "pooled_ci_low": lo,
            "pooled_ci_high": hi, "fold_mean": float(np.mean(folds)) if folds else math.nan,
            "fold_sd": float(np.std(folds, ddof=1)) if len(folds) > 1 else 0.0,
            "n_subjects": int(len(np.unique(owner))), "n_folds": n_folds, "n_repeats": 1}


def _fold_stats(values: Sequence[float]) -> dict:
    """``fold_mean``/``fold_sd`` of one pooled value per test fold (NaN folds left out)."""
    v = [float(x) for x in values if np.isfinite(x)]
    return {"fold_mean": float(np.mean(v)) if v else math.nan,
            "fold_sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}


def _ratio_row(task, label, name, variant, metric, hits, totals, fold_of, n_folds, n_boot, seed) -> dict:
    """A pooled rate sum(hits) / sum(totals) over subjects (lesion-wise sensitivity: 19 of 24 lesions,
    not the mean of per-subject rates, which would weigh a one-lesion subject like a five-lesion one),
    with a subject-cluster bootstrap interval (a subject's lesions are resampled together)."""
    hits, totals = np.asarray(hits, np.float64), np.asarray(totals, np.float64)
    fold_of = np.asarray(fold_of)
    has = totals > 0
    point = float(hits[has].sum() / totals[has].sum()) if has.any() else math.nan
    idx = np.flatnonzero(has)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot if len(idx) else 0):
        draw = idx[rng.integers(0, len(idx), len(idx))]
        boots.append(hits[draw].sum() / totals[draw].sum())
    lo, hi = (float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))) if boots else (math.nan, math.nan)
    folds = [hits[has & (fold_of == f)].sum() / totals[has & (fold_of == f)].sum()
             for f in np.unique(fold_of) if (has & (fold_of == f)).any()]
    return {"task": task, "label": label, "encoder": name, "variant": variant, "metric": metric, "estimate": point,
            "estimate_kind": "pooled", "ci_low": lo, "ci_high": hi, "pooled": point, "pooled_ci_low": lo,
            "pooled_ci_high": hi, **_fold_stats(folds), "n_subjects": int(has.sum()), "n_folds": int(n_folds),
            "n_repeats": 1, "n_events": int(totals[has].sum())}


def _subject_auc_row(name, variant, healthy, lesioned, fold_of, n_folds, n_boot, seed) -> dict:
    """Pooled AUROC of all healthy against all lesioned scans (a subject brings both to a resample)."""
    n = len(healthy)
    owner = np.r_[np.arange(n), np.arange(n)]
    truth = np.r_[np.zeros(n, bool), np.ones(n, bool)]
    return _cluster_auc_row(ANOMALY_TASK, "subject-level", name, variant, truth, np.r_[healthy, lesioned], owner,
                            n, fold_of, n_folds, n_boot, seed)


def _anomaly_figures(ctx, out: dict, results: dict, sets: Sequence[ProbeSet], primary: str) -> list:
    from slice2vol.eval import probe_plots

    figs = []
    kinds = {s.name: s.kind for s in sets}
    try:
        levels = ["pixel-level", "slice-level", "subject-level"]
        rows = [r for r in out["rows"] if r["variant"] == primary and r["label"] in levels]
        png, svg = probe_plots.grouped_bars(rows, Path(ctx.out) / "figures" / "anomaly_auroc", groups=levels,
                                            sets=[s.name for s in sets], kinds=kinds, ylim=(0.3, 1.0), chance=0.5,
                                            ylabel="AUROC", title=f"Simulated lesions ({primary}): AUROC, 95% CI")
        figs.append(_figure(ctx, "anomaly", "Anomaly detection of simulated lesions: pixel (voxels of a lesioned scan), "
                            "slice (lesion-cutting slices vs the same healthy slices) and subject level (pooled), "
                            "for every encoder, its random-init twin and the raw-intensity control", png, svg))
        sweep = out["extras"].get("sweep") or {}
        ac = ctx.cfg.anomaly
        if sweep and ac.sweep is not None:
            contrasts, radii = list(ac.sweep.contrasts), list(ac.sweep.radii_mm)
            for metric, fname, vmin in (("pixel_auroc", "anomaly_sweep_auroc", 0.5),
                                        ("detection_rate", "anomaly_sweep_detection", 0.0)):
                grids = {}
                for s in sets:
                    per = sweep.get(s.name, {}).get(primary)
                    if per is None:
                        continue
                    grids[s.name] = np.array([[per.get(f"c{c:.2f}-r{r:g}mm", {}).get(metric, np.nan) for r in radii]
                                              for c in contrasts])
                png, svg = probe_plots.sweep_heatmaps(grids, contrasts, radii, Path(ctx.out) / "figures" / fname,
                                                      metric=metric.replace("_", " "), vmin=vmin,
                                                      title=f"Difficulty sweep: {metric.replace('_', ' ')} "
                                                            "(one lesion per scan)")
                figs.append(_figure(ctx, "anomaly", f"Difficulty sweep ({ac.sweep.sign}intense, one spherical lesion per "
                                    f"scan, central slice scored): {metric.replace('_', ' ')} per contrast and radius",
                                    png, svg))
        examples = {s.name: results[(s.name, primary)].get("example") for s in sets if (s.name, primary) in results}
        first = next((e for e in examples.values() if e is not None), None)
        if first is not None:
            png, svg = probe_plots.lesion_examples(first["healthy"], first["lesioned"], first["lesion"],
                                                   {k: e["scores"] for k, e in examples.items() if e is not None},
                                                   Path(ctx.out) / "figures" / "anomaly_example",
                                                   title="Simulated lesions in a held-out scan and voxel anomaly scores")
            figs.append(_figure(ctx, "anomaly", "Simulated lesions drawn into a real held-out scan, with each set's "
                                "voxel anomaly scores (outline: lesion mask)", png, svg))
    except Exception as err:  # a figure must not lose the numbers
        log.warning("anomaly figures failed: %s", err)
    return figs


class AnomalyTask(Task):
    name = "anomaly"

    def run(self, ctx: TaskContext) -> TaskResult:
        return TaskResult.from_dict(run_anomaly(ctx))


TASK = AnomalyTask()

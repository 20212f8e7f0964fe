"""The ``segmentation`` task: dense linear probe of every 2D encoder, its random-init twin and the
raw-intensity control; every slice predicted, Dice and HD95 per structure on the original grid.

:func:`run_segmentation` builds the sets (:func:`~slice2vol.eval.dense_tasks.probe_sets`), extracts or
reuses their feature files, runs the cross-validation
(:func:`~slice2vol.eval.dense_bench.segmentation_cv`), and returns rows, paired tests (each encoder
against its twin, the control and the reference), figures and extras; the helpers shared with the
anomaly task live in :mod:`slice2vol.eval.dense_tasks`, the probe in :mod:`slice2vol.eval.segmentation`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from slice2vol.config import to_dict
from slice2vol.eval.dense_bench import DenseFeatureConfig, ProbeSet, content_hash, segmentation_cv
from slice2vol.eval.dense_tasks import (SEG_TASK, _code, _figure, _files, _folds, _gains, _later_task_needs,
                                        _loadable, _loader, _paired, _reference, _resolve_weights, _row,
                                        comparison_pairs, extraction_levels, probe_sets)
from slice2vol.eval.estimates import add_holm
from slice2vol.eval.tasks.base import Task, TaskContext, TaskResult

log = logging.getLogger(__name__)


def structures_of(sc, base) -> tuple[dict[str, list[int]], np.ndarray]:
    """(structure -> raw labels, the label look-up table) of a ``segmentation`` config section, the
    composite labels expanded through ``mapping_csv``. Raises ValueError for overlapping structures;
    the runner calls it before any caching (a config error found after an hour of caching costs that hour)."""
    from slice2vol.eval.segmentation import label_lut, muse_structures

    structures = {k: [int(v) for v in vs] for k, vs in sc.structures.items()}
    if sc.mapping_csv:
        structures = muse_structures(structures, _resolve_weights(sc.mapping_csv, base))
    return structures, label_lut(structures, max_label=255)


def run_segmentation(ctx) -> dict:
    """The segmentation task: every set, subject-level CV, Dice and HD95 per structure."""
    cfg, sc = ctx.cfg, ctx.cfg.segmentation
    out: dict[str, Any] = {"rows": [], "paired": [], "figures": [], "extras": {}, "skipped": []}
    load = _loader(ctx)
    with_seg = [s for s in ctx.cohort.subjects if getattr(s, "seg", None) is not None]
    structures, lut = structures_of(sc, ctx.base)
    wanted = sorted({v for vs in structures.values() for v in vs})
    subjects, out["skipped"] = _loadable(with_seg, load, SEG_TASK, sc.max_subjects or None, labels=wanted)
    if len(subjects) < 4:
        out["skipped"].append({"name": SEG_TASK, "reason": f"{len(subjects)} subjects with a segmentation (< 4)",
                               "substitute": None})
        return out
    names = list(structures)
    ids = [s.subject_id for s in subjects]
    folds, splits = _folds(ctx, SEG_TASK, ids, sc.n_folds)
    fold_of = np.zeros(len(ids), int)
    for f, (_, test) in enumerate(folds):
        fold_of[test] = f
    sets = probe_sets(sc, cfg.encoders, ctx.base)
    results: dict[str, dict] = {}
    for pset in sets:
        t0 = time.time()
        levels = extraction_levels(cfg, pset)
        probe = sc.probe
        if pset.kind == "control":  # one variant: every level of the control
            probe = dataclasses.replace(probe, variants={probe.primary_variant: levels})
        key = content_hash("segmentation", pset.identity(), to_dict(sc.features), to_dict(probe), structures, ids,
                           splits.to_dict(), to_dict(cfg.volume), cfg.seed, _code())
        res = ctx.cache.get("dense-seg", key) if ctx.cache else None
        if res is None:
            files = _files(ctx, pset, sc.features, levels)
            try:
                failures = files.ensure(subjects, load, progress=ctx.progress)
                if failures:
                    raise ValueError(f"dense features failed for {len(failures)} subject(s): {failures[:3]}")
                res = segmentation_cv(files, subjects, load, lut, len(names), folds, probe, seed=cfg.seed,
                                      progress=ctx.progress)
            except (ValueError, RuntimeError, NotImplementedError, AttributeError, OSError) as err:
                log.warning("segmentation: %s skipped (%s)", pset.name, err)
                out["skipped"].append({"name": f"{SEG_TASK}: {pset.name}", "reason": str(err)[:300],
                                       "substitute": None})
                continue
            res["extract_s"] = round(files.extract_s, 2)
            res["n_slices_embedded"] = files.n_extracted
            if not (sc.features.keep or _later_task_needs(ctx, SEG_TASK, sc.features, pset)):
                files.remove()
            if ctx.cache:
                ctx.cache.put("dense-seg", key, res)
        results[pset.name] = res
        ctx.timings[f"segmentation:{pset.name}"] = round(time.time() - t0, 2)
        log.info("segmentation / %s: %.1f s", pset.name, ctx.timings[f"segmentation:{pset.name}"])
    sets = [s for s in sets if s.name in results]
    variants = list(sc.probe.variants)
    primary = sc.probe.primary_variant
    absent = absent_structures(results, names, primary)
    for j in absent:  # Dice is NaN for every subject: no row, no paired test (a p of 1/(P+1) read as significant)
        out["skipped"].append({"name": f"{SEG_TASK}: {names[j]}", "substitute": None,
                               "reason": f"labels {structures[names[j]]} occur in no subject's segmentation"})
        log.warning("segmentation: structure %s skipped: its labels %s occur in no subject's segmentation",
                    names[j], structures[names[j]])
    for pset in sets:
        res = results[pset.name]
        for v in (variants if pset.kind != "control" else [primary]):
            if v not in res:
                continue
            label_v = _variant_label(v, res[v], sc.features, pset)
            for j, structure in enumerate(names):
                if j in absent:
                    continue
                out["rows"].append(_row(SEG_TASK, structure, pset.name, label_v, "dice", res[v]["dice"][:, j],
                                        fold_of, len(folds), cfg.n_bootstrap, cfg.seed))
                hd = res[v]["hd95"][:, j]
                if np.isfinite(hd).any() or np.isinf(hd).any():
                    out["rows"].append(_row(SEG_TASK, structure, pset.name, label_v, "hd95_mm", hd, fold_of,
                                            len(folds), cfg.n_bootstrap, cfg.seed, stat="median"))
    reference = _reference(ctx, sets)
    by_name = {s.name: s for s in sets}
    for a, b in comparison_pairs(sets, reference):
        for j, structure in enumerate(names):
            if j in absent:
                continue
            va, vb = results[a][primary]["dice"][:, j], results[b][primary]["dice"][:, j]
            out["paired"].append(_paired(SEG_TASK, structure, primary, "dice", a, b, va, vb, cfg.n_bootstrap,
                                         cfg.n_permutations, cfg.seed))
    add_holm(out["paired"])  # Holm within each table (task, label, variant, metric)
    out["extras"] = {
        "structures": structures, "subjects": ids, "primary_variant": primary,
        "sets": {s.name: {"kind": s.kind, "key": s.key, "weights": s.weights_id if s.kind != "control" else None,
                          "twin": s.twin, "control": s.control} for s in sets},
        "per_subject": {s: {v: {"dice": results[s][v]["dice"].tolist(), "hd95": results[s][v]["hd95"].tolist()}
                            for v in variants if v in results[s]} for s in results},
        "levels": {s: {v: results[s][v]["levels"] for v in variants if v in results[s]} for s in results},
        "timing_s": {s: results[s].get("timing_s") for s in results},
        "gains": _gains(out["paired"], by_name, primary),
        "notes": _seg_notes(sc, structures, len(ids), len(folds)),
    }
    out["figures"] = _seg_figures(ctx, out, results, sets, names, primary)
    return out


def absent_structures(results: dict, names: Sequence[str], primary: str) -> list[int]:
    """Indices of structures whose Dice is NaN for every subject of every set (absent from every truth)."""
    per_set = [res[primary]["dice"] for res in results.values() if primary in res]
    if not per_set:
        return []
    return [j for j in range(len(names)) if not any(np.isfinite(d[:, j]).any() for d in per_set)]


def _variant_label(v: str, res: dict, feat: DenseFeatureConfig, pset: ProbeSet) -> str:
    if pset.kind == "control":
        return v
    strides = "/".join(str(lv["stride"]) for lv in res.get("levels", []))
    return f"{v} (strides {strides} at {feat.img_size} px)" if strides else v


def _seg_notes(sc, structures: dict, n: int, k: int) -> list[str]:
    f = sc.features
    return [f"Segmentation probe: every {f.plane} slice of {n} subjects predicted and reassembled on the original "
            f"voxel grid; slices padded to {f.slice_size} px, encoders fed {f.img_size} px "
            f"({f.encoder_kwargs or 'default preprocessing'}); a linear 1x1 classifier (multinomial logistic "
            f"regression, L-BFGS, L2 {sc.probe.l2:g}) on level maps bilinearly upsampled to the label grid, trained on "
            f"{sc.probe.per_class} pixels per class from every {sc.probe.train_stride}th slice of the training "
            f"subjects; {k}-fold subject-level CV. Dice = mean over subjects; HD95 = median over subjects (mm, "
            f"MONAI). Structures: {', '.join(structures)}."]


def _seg_figures(ctx, out: dict, results: dict, sets: Sequence[ProbeSet], names: Sequence[str], primary: str) -> list:
    from slice2vol.eval import probe_plots

    figs = []
    kinds = {s.name: s.kind for s in sets}
    rows = [r for r in out["rows"] if r["metric"] == "dice" and (r["variant"].startswith(primary))]
    try:
        scored = [n for n in names if any(r["label"] == n for r in rows)]  # absent structures have no rows
        png, svg = probe_plots.grouped_bars(rows, Path(ctx.out) / "figures" / "segmentation_dice", groups=scored,
                                            sets=[s.name for s in sets], kinds=kinds, ylim=(0, 1), ylabel="Dice",
                                            title=f"Dense linear probe ({primary}): Dice per structure, "
                                                  "95% subject bootstrap CI")
        figs.append(_figure(ctx, "segmentation", "Dice per structure of every encoder, its random-init twin (hatched) "
                            "and the raw-intensity control (grey); every slice predicted, scored in 3D on the "
                            "original grid", png, svg))
        ex_name = next((s.name for s in sets if s.kind == "encoder"), sets[0].name if sets else None)
        ex = results[ex_name].get("example") if ex_name else None
        if ex is not None:
            preds = {s.name: results[s.name]["example"]["pred"][primary] for s in sets
                     if results[s.name].get("example") and primary in results[s.name]["example"]["pred"]}
            png, svg = probe_plots.segmentation_overlays(ex["image"], ex["truth"], preds, names,
                                                         Path(ctx.out) / "figures" / "segmentation_overlay",
                                                         title="A held-out subject: truth and out-of-fold predictions")
            figs.append(_figure(ctx, "segmentation", "Ground truth and each set's prediction on a held-out subject "
                                "(predicted in 3D, then cut)", png, svg))
    except Exception as err:  # a figure must not lose the numbers
        log.warning("segmentation figures failed: %s", err)
    return figs


class SegmentationTask(Task):
    name = "segmentation"

    def run(self, ctx: TaskContext) -> TaskResult:
        return TaskResult.from_dict(run_segmentation(ctx))


TASK = SegmentationTask()

"""The segmentation and anomaly tasks of ``slice2vol bench``: sets, splits, caching, rows, tests, figures.

Both tasks read a task context (the experiment config, the cohort, the output folder, the result
cache; see :mod:`slice2vol.eval.tasks.base`) and return ``rows``, ``paired``, ``figures``,
``extras`` and ``skipped`` in the shapes of the results schema (``slice2vol.results/2``).

Every table holds, beside each 2D encoder, its random-init twin (same architecture and
preprocessing, seeded random weights) and the raw-intensity control, and the paired tests
compare each encoder with both, so a number can be read as "what the pretraining adds" and
"what the network adds over the pixels".

Features are extracted once per (set, subject) by :class:`~slice2vol.eval.dense_bench.DenseFeatureFiles`
with the union of the levels both probes use, and removed after the last probe task of the run
unless ``features.keep`` is set; per-set results are cached by content (JSON + npz), so a rerun
with the same inputs reads them back without touching an encoder.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from slice2vol.config import to_dict
from slice2vol.eval.dense_bench import (DenseFeatureConfig, DenseFeatureFiles, ProbeSet, anomaly_cv, content_hash,
                                        segmentation_cv)

log = logging.getLogger(__name__)

SEG_TASK, ANOMALY_TASK = "segmentation", "anomaly"


# -- sets ---------------------------------------------------------------------------------------
def _resolve_weights(weights: str, base: Path) -> str:
    try:
        from slice2vol.eval.experiment import resolve_weights
    except ImportError:  # before the runner split
        from slice2vol.eval.runner import expand

        return weights if weights in ("random", "package") or weights.startswith("hub") else expand(weights, base)
    return resolve_weights(weights, base)


def _weights_identity(weights: str) -> str:
    try:
        from slice2vol.eval.sets import weights_identity
    except ImportError:  # before the runner split
        import hashlib

        path = Path(weights)
        if weights in ("random", "package") or weights.startswith("hub") or not path.is_file():
            return weights
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return weights_identity(weights)


def probe_sets(block, encoders: Sequence[Any], base: Path) -> list[ProbeSet]:
    """The columns of a probe table: chosen encoders, their random-init twins, the controls.

    Args:
        block: the task's config block (``encoders``, ``twins``, ``controls``).
        encoders: the experiment's 2D encoder entries (``name``, ``key``, ``weights``, ``kwargs``).

    A pretrained entry's twin is an entry of the list with the same key and kwargs and ``random``
    weights, or, with ``twins`` on, a new ``<name>:random-init`` set.

    Raises:
        ValueError: ``encoders`` names an entry the experiment does not have.
    """
    entries = list(encoders)
    if block.encoders is not None:
        known = {e.name for e in entries}
        unknown = [n for n in block.encoders if n not in known]
        if unknown:
            raise ValueError(f"unknown encoder name(s) {unknown} in the probe block; the experiment has {sorted(known)}")
        entries = [e for e in entries if e.name in block.encoders]
    sets: list[ProbeSet] = []
    for e in entries:
        weights = _resolve_weights(e.weights, base)
        kind = "twin" if weights == "random" else "encoder"
        sets.append(ProbeSet(e.name, kind, key=e.key, weights=weights, kwargs=dict(e.kwargs),
                             weights_id=_weights_identity(weights)))
    for s in [s for s in sets if s.kind == "encoder"]:
        twin = next((t for t in sets if t.kind == "twin" and t.key == s.key and t.kwargs == s.kwargs), None)
        if twin is None and block.twins:
            twin = ProbeSet(f"{s.name}:random-init", "twin", key=s.key, weights="random", kwargs=dict(s.kwargs))
            sets.insert(sets.index(s) + 1, twin)
        s.twin = twin.name if twin else None
    for name, params in (block.controls or {}).items():
        sets.append(ProbeSet(f"control:{name}", "control", control=dict(params or {})))
    return sets


def extraction_levels(cfg, pset: ProbeSet) -> list:
    """Level selectors extracted for a set: the union of what the segmentation variants and the
    anomaly scorer variants use (the control: all of its levels)."""
    if pset.kind == "control":
        from slice2vol.eval.dense import IntensityFeatures

        return list(range(len(IntensityFeatures(**(pset.control or {})).feature_info())))
    levels: list = []
    tasks = list(getattr(cfg, "tasks", []) or [])
    if SEG_TASK in tasks:
        for sel in cfg.segmentation.probe.variants.values():
            levels += [str(v) for v in sel]
    if ANOMALY_TASK in tasks and _anomaly_features(cfg) == cfg.segmentation.features:
        for name in cfg.anomaly.variants:
            levels += [str(v) for v in _scorer(cfg.anomaly, name).levels]
    if not levels:  # a task on its own features
        levels = [str(v) for v in cfg.segmentation.probe.variants.get(cfg.segmentation.probe.primary_variant, [])]
    return sorted(set(levels), key=levels.index)


def _anomaly_features(cfg) -> DenseFeatureConfig:
    return cfg.anomaly.features if cfg.anomaly.features is not None else cfg.segmentation.features


def _scorer(block, variant: str):
    return dataclasses.replace(block.scorer, **dict(block.variants.get(variant) or {}))


def _files(ctx, pset: ProbeSet, feat: DenseFeatureConfig, levels: Sequence) -> DenseFeatureFiles:
    volume_id = to_dict(ctx.cfg.volume)
    return DenseFeatureFiles(Path(ctx.out) / "cache" / "dense", pset, feat, levels, volume_id, seed=ctx.cfg.seed,
                             device=getattr(ctx.cfg, "device", "cpu"))


_VOLUME_MEMO_BYTES = 2 << 30


def _loader(ctx, budget: int = _VOLUME_MEMO_BYTES) -> Callable[[Any], Any]:
    """subject -> loaded Volume, remembered (up to ``budget`` bytes) for the other sets of the task.

    Every set of a dense task reads every subject's volume (truth, lesions); loading and masking a
    NIfTI again per set was ~5-8% of the task. Volumes are kept until the budget is full, then
    simply not added (sets visit subjects in the same order, so an LRU would never hit).
    """
    from slice2vol.data.manifest import load_subject

    memo: dict[str, Any] = {}
    used = [0]

    def load(subject):
        key = str(subject.subject_id)
        if key in memo:
            return memo[key]
        volume = load_subject(subject, ctx.cfg.volume)
        size = sum(int(getattr(a, "nbytes", 0)) for a in (volume.data, volume.mask, volume.seg) if a is not None)
        if used[0] + size <= budget:
            memo[key] = volume
            used[0] += size
        return volume

    return load


def _folds(ctx, task: str, ids: Sequence[str], n_folds: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], Any]:
    from slice2vol.eval.splits import SplitConfig, load_or_make_splits

    n_folds = max(2, min(n_folds, len(ids) // 2))
    splits = load_or_make_splits(Path(ctx.out) / "splits" / f"{task}-k{n_folds}.json", list(ids), None, "categorical",
                                 cfg=SplitConfig(n_folds=n_folds, n_repeats=1, seed=ctx.cfg.seed))
    return [splits.positions(list(ids), f) for f in splits.folds], splits


def _later_task_needs(ctx, task: str, feat: DenseFeatureConfig, pset: ProbeSet) -> bool:
    """Whether the anomaly task runs after ``task`` and will read this set's feature files."""
    tasks = list(ctx.cfg.tasks)
    if not (task == SEG_TASK and ANOMALY_TASK in tasks and tasks.index(ANOMALY_TASK) > tasks.index(SEG_TASK)):
        return False
    if _anomaly_features(ctx.cfg) != feat:
        return False
    try:
        later = probe_sets(ctx.cfg.anomaly, ctx.cfg.encoders, ctx.base)
    except ValueError:
        return False
    return any(s.identity() == pset.identity() for s in later)


# -- rows and paired tests ----------------------------------------------------------------------
def _row(task: str, label: str, encoder: str, variant: str, metric: str, values: np.ndarray, fold_of: np.ndarray,
         n_folds: int, n_boot: int, seed: int, stat: str = "mean") -> dict:
    """A results row of per-subject ``values`` (the estimate is their mean or median over
    subjects, with a subject-level bootstrap interval; fold mean/sd over the test folds)."""
    v = np.asarray(values, dtype=np.float64)
    ok = ~np.isnan(v)
    agg = np.nanmean if stat == "mean" else np.nanmedian
    est = float(agg(v)) if ok.any() else math.nan
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(ok)
    boots = [agg(v[idx[rng.integers(0, len(idx), len(idx))]]) for _ in range(n_boot)] if len(idx) else []
    b = np.asarray([x for x in boots if not np.isnan(x)])
    lo, hi = (float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))) if len(b) else (math.nan, math.nan)
    folds = [float(agg(v[(fold_of == f) & ok])) for f in np.unique(fold_of) if ((fold_of == f) & ok).any()]
    fm = float(np.mean(folds)) if folds else math.nan
    fsd = float(np.std(folds, ddof=1)) if len(folds) > 1 else 0.0
    return {"task": task, "label": label, "encoder": encoder, "variant": variant, "metric": metric,
            "estimate": est, "estimate_kind": "pooled", "ci_low": lo, "ci_high": hi, "pooled": est,
            "pooled_ci_low": lo, "pooled_ci_high": hi, "fold_mean": fm, "fold_sd": fsd, "n_subjects": int(ok.sum()),
            "n_folds": int(n_folds), "n_repeats": 1}


def _paired(task: str, label: str, variant: str, metric: str, encoder: str, reference: str, a: np.ndarray,
            b: np.ndarray, n_boot: int, n_perm: int, seed: int) -> dict:
    """Paired bootstrap interval and permutation p of mean(a) - mean(b) over the subjects both have."""
    from slice2vol.eval.metrics import paired_test

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    test = paired_test(np.zeros(int(ok.sum())), a[ok][None], b[ok][None], lambda y, p: float(np.mean(p)),
                       n_boot=n_boot, n_perm=n_perm, seed=seed)
    return {"task": task, "label": label, "variant": variant, "metric": metric, "encoder": encoder,
            "reference": reference, "estimate_kind": "pooled", **test, "p_holm": math.nan,
            "n_subjects": int(ok.sum())}


def comparison_pairs(sets: Sequence[ProbeSet], reference: str | None) -> list[tuple[str, str]]:
    """(set, reference) pairs of the paired tables: every encoder against its twin and each
    control, every twin against each control, every other set against the reference encoder."""
    pairs: list[tuple[str, str]] = []
    controls = [s.name for s in sets if s.kind == "control"]
    for s in sets:
        if s.kind == "encoder" and s.twin:
            pairs.append((s.name, s.twin))
        if s.kind in ("encoder", "twin"):
            pairs += [(s.name, c) for c in controls]
    if reference:
        pairs += [(s.name, reference) for s in sets if s.name != reference and s.kind != "control"]
    seen, out = set(), []
    for p in pairs:
        if p not in seen and (p[1], p[0]) not in seen:
            seen.add(p)
            out.append(p)
    return out


def _reference(ctx, sets: Sequence[ProbeSet]) -> str | None:
    ref = getattr(ctx, "reference", None) or getattr(ctx.cfg, "reference", None) or ""
    names = [s.name for s in sets if s.kind == "encoder"]
    head = str(ref).split("/")[0]
    return head if head in names else (names[0] if names else None)


def _holm(paired: list[dict]) -> None:
    """Holm-adjusted p within each (task, label, variant, metric) table, in place."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(paired):
        groups.setdefault((p["task"], p["label"], p["variant"], p["metric"]), []).append(i)
    for members in groups.values():
        order = sorted(members, key=lambda i: paired[i]["p_value"])
        running = 0.0
        for rank, i in enumerate(order):
            running = max(running, min(1.0, (len(order) - rank) * paired[i]["p_value"]))
            paired[i]["p_holm"] = running


# -- segmentation ------------------------------------------------------------------------------
def run_segmentation(ctx) -> dict:
    """The segmentation task: every set, subject-level CV, Dice and HD95 per structure."""
    from slice2vol.eval.segmentation import label_lut, muse_structures

    cfg, sc = ctx.cfg, ctx.cfg.segmentation
    out: dict[str, Any] = {"rows": [], "paired": [], "figures": [], "extras": {}, "skipped": []}
    subjects = [s for s in ctx.cohort.subjects if getattr(s, "seg", None) is not None][: sc.max_subjects or None]
    if len(subjects) < 4:
        out["skipped"].append({"name": SEG_TASK, "reason": f"{len(subjects)} subjects with a segmentation (< 4)",
                               "substitute": None})
        return out
    structures = {k: [int(v) for v in vs] for k, vs in sc.structures.items()}
    if sc.mapping_csv:
        structures = muse_structures(structures, _resolve_weights(sc.mapping_csv, ctx.base))
    lut = label_lut(structures, max_label=255)
    names = list(structures)
    ids = [s.subject_id for s in subjects]
    folds, splits = _folds(ctx, SEG_TASK, ids, sc.n_folds)
    fold_of = np.zeros(len(ids), int)
    for f, (_, test) in enumerate(folds):
        fold_of[test] = f
    sets = probe_sets(sc, cfg.encoders, ctx.base)
    load = _loader(ctx)
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
    for pset in sets:
        res = results[pset.name]
        for v in (variants if pset.kind != "control" else [primary]):
            if v not in res:
                continue
            label_v = _variant_label(v, res[v], sc.features, pset)
            for j, structure in enumerate(names):
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
            va, vb = results[a][primary]["dice"][:, j], results[b][primary]["dice"][:, j]
            out["paired"].append(_paired(SEG_TASK, structure, primary, "dice", a, b, va, vb, cfg.n_bootstrap,
                                         cfg.n_permutations, cfg.seed))
    _holm(out["paired"])
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


def _variant_label(v: str, res: dict, feat: DenseFeatureConfig, pset: ProbeSet) -> str:
    if pset.kind == "control":
        return v
    strides = "/".join(str(lv["stride"]) for lv in res.get("levels", []))
    return f"{v} (strides {strides} at {feat.img_size} px)" if strides else v


def _gains(paired: list[dict], sets: dict, variant: str) -> dict:
    """encoder -> structure -> {over twin, over each control}: delta and its interval."""
    gains: dict = {}
    for p in paired:
        enc, ref = p["encoder"], p["reference"]
        if enc not in sets or sets[enc].kind != "encoder" or p["variant"] != variant:
            continue
        if ref == sets[enc].twin or sets.get(ref) is not None and sets[ref].kind == "control":
            gains.setdefault(enc, {}).setdefault(p["label"], {})[ref] = {
                "delta": p["delta"], "ci_low": p["ci_low"], "ci_high": p["ci_high"], "p_holm": p["p_holm"]}
    return gains


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
        png, svg = probe_plots.grouped_bars(rows, Path(ctx.out) / "figures" / "segmentation_dice", groups=names,
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


def _figure(ctx, section: str, caption: str, png, svg) -> dict:
    import os

    rel = lambda p: os.path.relpath(p, ctx.out) if p is not None else None  # noqa: E731
    return {"section": section, "caption": caption, "png": rel(png), "svg": rel(svg)}


def _code() -> str:
    try:
        from slice2vol.eval.resultcache import code_version
    except ImportError:
        return "pre-split"
    return code_version()


# -- anomaly -------------------------------------------------------------------------------------
def run_anomaly(ctx) -> dict:
    """The anomaly task: every set x scorer variant, pixel/region/slice/subject levels, sweep."""
    from slice2vol.eval.anomaly import paired_rank_fraction
    from slice2vol.eval.lesions import describe
    from slice2vol.eval.metrics import _binary_auc

    cfg, ac = ctx.cfg, ctx.cfg.anomaly
    out: dict[str, Any] = {"rows": [], "paired": [], "figures": [], "extras": {}, "skipped": []}
    subjects = list(ctx.cohort.subjects)[: ac.max_subjects or None]
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
    load = _loader(ctx)
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
                     "pooled_ci_high": pooled["ci_high"]})
        rate = np.where(res["n_lesions"] > 0, res["detected"] / np.maximum(res["n_lesions"], 1), np.nan)
        rows.append(_row(ANOMALY_TASK, f"region-level (lesions detected at {ac.fpr:.0%} voxel FPR)", name, variant,
                         "detection_rate", rate, fold_of, len(folds), n_boot, seed))
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
                "pixel_auroc": float(np.nanmean(v["pixel_auroc"])), "detection_rate": float(np.mean(v["detected"])),
                "per_subject_pixel_auroc": np.asarray(v["pixel_auroc"]).tolist()}
    primary = variants[0]
    reference = _reference(ctx, sets)
    for a, b in comparison_pairs(sets, reference):
        if (a, primary) in results and (b, primary) in results:
            out["paired"].append(_paired(ANOMALY_TASK, "pixel-level", primary, "auroc", a, b,
                                         results[(a, primary)]["pixel_auroc"], results[(b, primary)]["pixel_auroc"],
                                         n_boot, n_perm, seed))
    _holm(out["paired"])
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

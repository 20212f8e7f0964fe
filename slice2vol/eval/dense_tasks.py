"""What the ``segmentation`` and ``anomaly`` tasks of ``slice2vol bench`` share: sets, splits,
feature files, volume loading, rows, paired tests, Holm. The tasks themselves are
:mod:`slice2vol.eval.tasks.segmentation` and :mod:`slice2vol.eval.tasks.anomaly`.

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
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from slice2vol.config import to_dict
from slice2vol.eval.dense_bench import DenseFeatureConfig, DenseFeatureFiles, ProbeSet

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


def _loadable(subjects: Sequence[Any], load: Callable[[Any], Any], task: str,
              limit: int | None = None, labels: Sequence[int] | None = None) -> tuple[list[Any], list[dict]]:
    """The first ``limit`` (all: None) of ``subjects`` whose volume loads, and a skipped entry for each
    one that does not.

    A subject whose files cannot be read fails for every set alike: it is left out of the task before
    the folds are made, so the sets are still compared on the same subjects, instead of every set
    being skipped for it. ``load`` remembers what it loaded, so the sets do not read the files again.
    """
    from slice2vol.data.io import VolumeError
    from slice2vol.data.manifest import Failure

    kept, skipped = [], []
    for subject in subjects:
        if limit is not None and len(kept) >= limit:
            break
        try:
            volume = load(subject)
            seg = getattr(volume, "seg", None)
            if seg is not None and not np.any(seg):
                # all background: the probe would learn every voxel of it as background, and the
                # anomaly task would take the whole head (skull too) for its brain, without a word
                raise VolumeError(getattr(subject, "seg", None) or "its seg map", "the seg map labels no voxel (all 0)")
            if seg is not None and labels is not None and not np.isin(seg, labels).any():
                # a map from another atlas or label table: the probe trained on its whole head as
                # background, without a word
                held = np.unique(seg[seg != 0])
                shown = ", ".join(str(int(v)) for v in held[:5]) + (", ..." if len(held) > 5 else "")
                raise VolumeError(getattr(subject, "seg", None) or "its seg map",
                                  f"the seg map holds none of the labels of segmentation.structures "
                                  f"({', '.join(map(str, labels[:8]))}{', ...' if len(labels) > 8 else ''}); it holds "
                                  f"{shown} (another atlas or label table?)")
        except Exception as err:  # noqa: BLE001 - one subject's files fail that subject only
            reason = Failure.of(subject, err).message  # "<file>: <problem>"; the entry's name gives the subject
            log.warning("%s: subject %s left out: %s", task, subject.subject_id, reason)
            skipped.append({"name": f"{task}: subject {subject.subject_id}", "reason": reason, "substitute": None})
            continue
        kept.append(subject)
    return kept, skipped


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
    # HD95 is inf for a structure a subject's prediction missed: interpolating between two infs gives
    # NaN (inf - inf), so with infs the interval takes the nearest order statistics outward instead
    bounded = not np.isinf(b).any()
    lo, hi = ((float(np.quantile(b, 0.025, method="linear" if bounded else "lower")),
               float(np.quantile(b, 0.975, method="linear" if bounded else "higher"))) if len(b)
              else (math.nan, math.nan))
    folds = [float(agg(v[(fold_of == f) & ok])) for f in np.unique(fold_of) if ((fold_of == f) & ok).any()]
    with np.errstate(invalid="ignore"):  # inf fold values: the mean is inf and the sd undefined (NaN)
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


# -- segmentation ------------------------------------------------------------------------------


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

"""Dense segmentation probe task: a linear head on frozen patch tokens of every 2D encoder, 3D Dice.

(Moved from the runner as it was; the probe itself lives in :mod:`slice2vol.eval.segmentation`.)
"""

from __future__ import annotations

import logging
import time

import numpy as np

from slice2vol.config import to_dict
from slice2vol.data.slicing import SliceConfig
from slice2vol.eval.estimates import metric_row
from slice2vol.eval.experiment import expand, resolve_weights
from slice2vol.eval.metrics import bootstrap_ci
from slice2vol.eval.resultcache import content_key
from slice2vol.eval.sets import weights_identity
from slice2vol.eval.splits import SplitConfig, load_or_make_splits
from slice2vol.eval.tasks.base import Task, TaskContext, TaskResult
from slice2vol.progress import track

log = logging.getLogger(__name__)


def _nearest_fill(grid, kept: np.ndarray, axis: int):
    """Copies each skipped slice (along ``axis`` of a (K, X, Y, Z) tensor) from the nearest kept one."""
    import torch

    n = grid.shape[1 + axis]
    nearest = kept[np.abs(np.arange(n)[:, None] - kept[None]).argmin(1)]
    return grid.index_select(1 + axis, torch.as_tensor(nearest, device=grid.device))


def _overlay_slice(volume, pred: np.ndarray, truth: np.ndarray, axis: int) -> dict:
    """Middle slice through the brain along ``axis``, in display orientation (superior up)."""
    brain = np.argwhere(truth > 0)
    mid = int(np.median(brain[:, axis])) if len(brain) else volume.shape[axis] // 2

    def cut(a: np.ndarray) -> np.ndarray:
        return np.flipud(np.take(a, mid, axis=axis).T)

    return {"image": cut(volume.data[0]), "truth": cut(truth), "pred": cut(pred)}


def run_segmentation(ctx: TaskContext) -> dict:
    """Dense linear probe of every 2D encoder; Dice per structure per subject (out-of-fold)."""
    import torch

    from slice2vol.data.manifest import load_subject
    from slice2vol.data.slicing import PLANES, slice_volume, slices_to_grid
    from slice2vol.encoders.base import build_encoder
    from slice2vol.eval.segmentation import (DenseLinearProbe, apply_lut, dice_per_class, label_lut, labels_in_box,
                                             muse_structures, place_in_box, token_box)

    cfg, cache, out = ctx.cfg, ctx.cache, ctx.out
    sc = cfg.segmentation
    subjects = [s for s in ctx.cohort.subjects if s.seg is not None][: sc.max_subjects or None]
    if len(subjects) < 2 * min(cfg.splits.n_folds, 3):
        log.warning("segmentation: %d subjects with a segmentation; skipped", len(subjects))
        return {"rows": [], "per_subject": [], "overlay": None}
    structures = {k: [int(v) for v in vs] for k, vs in sc.structures.items()}
    if sc.mapping_csv:
        structures = muse_structures(structures, expand(sc.mapping_csv, ctx.base))
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
        weights = resolve_weights(entry.weights, ctx.base)
        kwargs = {**entry.kwargs, **sc.encoder_kwargs}
        key = content_key("seg", entry.key, weights_identity(weights), kwargs, to_dict(sc), structures, to_dict(cfg.volume), ids,
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
            grid = (0, 0)
            for vol in track(volumes, desc=f"seg tokens {entry.name}", unit="vol", enabled=ctx.progress):
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
        ctx.timings[f"segmentation:{entry.name}"] = round(time.time() - t0, 2)
        dice = np.asarray(result["dice"])
        for j, structure in enumerate(names):
            vals = dice[:, j]
            finite = np.isfinite(vals)
            point, lo, hi = bootstrap_ci(vals[finite], vals[finite][None], lambda y, p: float(np.mean(p)),
                                         n_boot=cfg.n_bootstrap, seed=cfg.seed)
            # fold values: mean Dice of each test fold
            fold_vals = [float(np.nanmean(vals[splits.positions(ids, f)[1]])) for f in splits.folds]
            rows.append(metric_row(task="segmentation", label=structure, encoder=entry.name,
                                   variant=f"{sc.plane} linear, tokens {result['grid'][0]}x{result['grid'][1]}",
                                   metric="dice", pooled=point, pooled_ci=(lo, hi), fold_values=fold_vals,
                                   n_subjects=int(finite.sum()), n_folds=n_folds, n_repeats=1))
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


class SegmentationTask(Task):
    name = "segmentation"

    def run(self, ctx: TaskContext) -> TaskResult:
        from slice2vol.eval import plots

        if not ctx.cfg.encoders:
            return TaskResult(skipped=[{"name": "segmentation", "reason": "no 2D encoder entry", "substitute": None}])
        seg = run_segmentation(ctx)
        result = TaskResult(rows=seg["rows"], extras={"per_subject": seg["per_subject"],
                                                      "structures": seg.get("structures")})
        if seg["rows"]:
            bars = [{**r, "point": r["estimate"]} for r in seg["rows"]]
            path = plots.score_bars(bars, ctx.fig_dir / "segmentation_dice.png", group_key="label",
                                    title="Dense linear probe: Dice per structure (95% bootstrap CI)",
                                    metric_label="Dice")
            result.figures.append(ctx.figure("segmentation", "Segmentation probe: mean Dice per structure over "
                                             "held-out subjects (3D, original grid)", path))
            ov = seg.get("overlay")
            if ov:
                path = plots.segmentation_overlay(ov["image"], ov["truth"], ov["predictions"], ov["classes"],
                                                  ctx.fig_dir / "segmentation_overlay.png",
                                                  title=f"{ov['subject']} (held out): ground truth and probe predictions")
                result.figures.append(ctx.figure("segmentation", "Segmentation overlay on a held-out subject, "
                                                 "prediction reassembled in 3D then cut", path))
        return result


TASK = SegmentationTask()

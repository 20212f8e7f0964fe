"""Anomaly detection task: simulated lesions in held-out healthy volumes, subject- and slice-level AUROC.

(Moved from the runner as it was; scorers and lesion simulation live in :mod:`slice2vol.eval.anomaly`.)
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import numpy as np

from slice2vol.config import to_dict
from slice2vol.data.slicing import SliceConfig
from slice2vol.eval.estimates import metric_row
from slice2vol.eval.experiment import ExperimentConfig, resolve_weights
from slice2vol.eval.resultcache import content_key
from slice2vol.eval.sets import weights_identity
from slice2vol.eval.splits import SplitConfig, SubjectSplits, load_or_make_splits
from slice2vol.eval.tasks.base import Task, TaskContext, TaskResult
from slice2vol.progress import track

log = logging.getLogger(__name__)


def _embedder_2d(encoder, cfg: ExperimentConfig) -> Callable:
    from slice2vol.data.slicing import PLANES, slice_volume

    ac = cfg.anomaly
    slice_cfg = SliceConfig(planes=(ac.plane,), stride=ac.stride, min_foreground=cfg.slices.min_foreground,
                            context=cfg.slices.context, size=ac.size)

    def embed(volume, lesion: np.ndarray | None):
        ps = slice_volume(volume, slice_cfg)[ac.plane]
        feats = encoder.embed(ps.images, 32).cpu().numpy().astype(np.float32)
        axis = PLANES[ac.plane]
        hit = np.zeros(len(ps.indices), dtype=bool)
        if lesion is not None:
            per_slice = lesion.sum(axis=tuple(a for a in range(3) if a != axis))
            hit = per_slice[ps.indices] >= 5
        return feats.mean(0), feats, hit

    return embed


def _embedder_3d(model, input_size: Sequence[int], margin: int = 4) -> Callable:
    """Whole-volume embedding as :func:`slice2vol.ssl.export.embed_cohort` does it: the head box
    (plus ``margin`` voxels) fitted into ``input_size`` with its aspect ratio kept."""
    import torch

    from slice2vol.ssl.data import fit_to_grid

    def embed(volume, lesion):
        box = np.argwhere(volume.mask)
        lo = np.maximum(box.min(0) - margin, 0) if len(box) else np.zeros(3, int)
        hi = np.minimum(box.max(0) + margin + 1, volume.shape) if len(box) else np.asarray(volume.shape)
        data = volume.data[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        image = fit_to_grid(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), volume.spacing,
                            tuple(input_size))
        with torch.no_grad():
            z = model(image[None])
        return z.reshape(-1).numpy().astype(np.float32), None, None

    return embed


def run_anomaly(ctx: TaskContext) -> dict:
    """Simulated lesions on held-out healthy volumes; subject- and slice-level AUROC per scorer."""
    import torch

    from slice2vol.data.manifest import load_subject
    from slice2vol.encoders.base import build_encoder
    from slice2vol.eval.anomaly import build_scorer, simulate_lesions
    from slice2vol.eval.metrics import _binary_auc

    cfg, cache = ctx.cfg, ctx.cache
    ac = cfg.anomaly
    subjects = ctx.cohort.subjects[: ac.max_subjects or None]
    ids = [s.subject_id for s in subjects]
    n_folds = min(cfg.splits.n_folds, len(ids) // 2)
    splits = load_or_make_splits(ctx.out / "splits" / "anomaly.json", ids, None, "categorical",
                                 cfg=SplitConfig(n_folds=n_folds, n_repeats=1, seed=cfg.seed))
    embedders: dict[str, tuple[str, Any]] = {}
    for entry in cfg.encoders:
        embedders[entry.name] = ("2d", (entry, resolve_weights(entry.weights, ctx.base)))
    for entry in cfg.encoders3d:
        if ctx.models3d.get(entry.name) is not None:
            embedders[entry.name] = ("3d", entry)
    rows = []
    volumes = lesioned = None
    for name, (kind, spec) in embedders.items():
        ident = ([spec[0].key, weights_identity(spec[1]), spec[0].kwargs] if kind == "2d" else
                 [spec.name, spec.checkpoint, spec.ssl, list(spec.input_size)])
        key = content_key("anomaly", kind, ident, to_dict(ac), to_dict(cfg.volume), ids, cfg.seed,
                          cfg.slices.context, cfg.slices.min_foreground)
        result = cache.get("anomaly", key)
        t0 = time.time()
        if result is None:
            if volumes is None:
                volumes = [load_subject(s, cfg.volume) for s in subjects]
                lesioned = [simulate_lesions(v, np.random.default_rng([cfg.seed, ac.seed, i]), ac)
                            for i, v in enumerate(volumes)]
            if kind == "2d":
                torch.manual_seed(cfg.seed)
                entry, weights = spec
                encoder = build_encoder(entry.key, weights=weights, **entry.kwargs).to(cfg.device)
                embed = _embedder_2d(encoder, cfg)
            else:
                embed = _embedder_3d(ctx.models3d[name], spec.input_size)
            healthy, sick = [], []
            for i in track(range(len(volumes)), desc=f"anomaly {name}", unit="vol", enabled=ctx.progress):
                healthy.append(embed(volumes[i], None))
                sick.append(embed(lesioned[i][0], lesioned[i][1]))
            result = _score_anomaly(healthy, sick, splits, ids, ac, build_scorer, _binary_auc)
            cache.put("anomaly", key, result)
        ctx.timings[f"anomaly:{name}"] = round(time.time() - t0, 2)
        for scorer, res in result["subject"].items():
            rows.append(_auc_row(name, scorer, "subject", res, cfg, len(ids), n_folds))
        for scorer, res in result.get("slice", {}).items():
            rows.append(_auc_row(name, scorer, "slice", res, cfg, len(ids), n_folds))
    example_key = content_key("anomaly-example", ids, to_dict(ac), cfg.seed)
    if volumes is not None and lesioned is not None:
        example = _lesion_example(volumes[0], *lesioned[0])
        cache.put("anomaly-example", example_key, example)
    else:
        example = cache.get("anomaly-example", example_key)
    return {"rows": rows, "example": example}


def _score_anomaly(healthy, sick, splits: SubjectSplits, ids, ac, build_scorer, auc_fn) -> dict:
    h = np.stack([e[0] for e in healthy])
    s = np.stack([e[0] for e in sick])
    n = len(ids)
    out: dict[str, dict] = {"subject": {}, "slice": {}}
    for scorer_name in ac.scorers:
        score_h, score_s, fold_auc = np.full(n, np.nan), np.full(n, np.nan), []
        slice_scores, slice_truth, slice_owner, slice_fold_auc = [], [], [], []
        for fold in splits.folds:
            tr, te = splits.positions(ids, fold)
            scorer = build_scorer(scorer_name, ac).fit(h[tr])
            score_h[te], score_s[te] = scorer.score(h[te]), scorer.score(s[te])
            fold_auc.append(auc_fn(np.r_[np.zeros(len(te)), np.ones(len(te))].astype(bool),
                                   np.r_[score_h[te], score_s[te]]))
            if healthy[0][1] is not None and scorer_name == "knn":
                # slice level: healthy training slices are the reference set
                ref = np.concatenate([healthy[i][1] for i in tr])
                sl_scorer = build_scorer("knn", ac).fit(ref)
                fs, ft = [], []
                for i in te:
                    hit = sick[i][2]
                    if len(healthy[i][1]) != len(hit) or not hit.any():
                        continue
                    # positives: lesion-cutting slices; negatives: the SAME slices of the healthy scan,
                    # so slice position (edge slices look atypical) cannot drive the AUROC
                    for feats, truth in ((healthy[i][1][hit], np.zeros(int(hit.sum()), bool)),
                                         (sick[i][1][hit], np.ones(int(hit.sum()), bool))):
                        fs.append(sl_scorer.score(feats))
                        ft.append(truth)
                        slice_owner.append(np.full(len(feats), i))
                if not fs:
                    continue
                fs_arr, ft_arr = np.concatenate(fs), np.concatenate(ft)
                slice_scores.append(fs_arr)
                slice_truth.append(ft_arr)
                slice_fold_auc.append(auc_fn(ft_arr, fs_arr))
        out["subject"][scorer_name] = {"healthy": score_h, "lesioned": score_s, "fold_auc": fold_auc}
        if slice_scores:
            out["slice"]["knn"] = {"scores": np.concatenate(slice_scores), "truth": np.concatenate(slice_truth),
                                   "owner": np.concatenate(slice_owner), "fold_auc": slice_fold_auc}
    return out


def _auc_row(name: str, scorer: str, level: str, res: dict, cfg: ExperimentConfig, n_subjects: int,
             n_folds: int) -> dict:
    from slice2vol.eval.metrics import _binary_auc

    rng = np.random.default_rng(cfg.seed)
    if level == "subject":
        h, s = np.asarray(res["healthy"]), np.asarray(res["lesioned"])
        n = len(h)
        truth = np.r_[np.zeros(n), np.ones(n)].astype(bool)
        point = _binary_auc(truth, np.r_[h, s])
        boots = []
        for _ in range(cfg.n_bootstrap):
            idx = rng.integers(0, n, n)  # a subject brings its healthy and its lesioned scan
            boots.append(_binary_auc(truth[np.r_[idx, idx + n]], np.r_[h[idx], s[idx]]))
    else:
        scores, truth, owner = np.asarray(res["scores"]), np.asarray(res["truth"]), np.asarray(res["owner"])
        point = _binary_auc(truth, scores)
        # slices of one subject are not independent: resample whole subjects (cluster bootstrap)
        members = [np.flatnonzero(owner == i) for i in range(n_subjects)]
        boots = []
        for _ in range(cfg.n_bootstrap):
            idx = np.concatenate([members[i] for i in rng.integers(0, n_subjects, n_subjects)])
            boots.append(_binary_auc(truth[idx], scores[idx]))
    b = np.asarray([v for v in boots if np.isfinite(v)])
    lo, hi = (float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))) if len(b) else (np.nan, np.nan)
    return metric_row(task="anomaly", label=f"{level}-level", encoder=name, variant=scorer, metric="auroc",
                      pooled=float(point), pooled_ci=(lo, hi), fold_values=res["fold_auc"], n_subjects=n_subjects,
                      n_folds=n_folds, n_repeats=1)


def _lesion_example(volume, lesioned, lesion: np.ndarray) -> dict:
    z = int(np.argmax(lesion.sum((0, 1)))) if lesion.any() else volume.shape[2] // 2

    def cut(a: np.ndarray) -> np.ndarray:
        return np.flipud(a[:, :, z].T)

    return {"healthy": cut(volume.data[0]), "lesioned": cut(lesioned.data[0]), "lesion": cut(lesion)}


class AnomalyTask(Task):
    name = "anomaly"

    def run(self, ctx: TaskContext) -> TaskResult:
        from slice2vol.eval import plots

        anomaly = run_anomaly(ctx)
        result = TaskResult(rows=anomaly["rows"])
        if anomaly["rows"]:
            bars = [{**r, "point": r["estimate"], "level_scorer": f"{r['label']} {r['variant']}"} for r in anomaly["rows"]]
            path = plots.score_bars(bars, ctx.fig_dir / "anomaly_auroc.png", group_key="level_scorer",
                                    title="Anomaly detection on simulated lesions: AUROC (95% CI)", metric_label="AUROC",
                                    chance=0.5)
            result.figures.append(ctx.figure("anomaly", "Anomaly detection: AUROC of healthy vs lesioned held-out "
                                             "scans (subject level) and of lesion-cutting slices (slice level, k-NN "
                                             "scorer)", path))
            ex = anomaly.get("example")
            if ex:
                path = plots.lesion_example(ex["healthy"], ex["lesioned"], ex["lesion"],
                                            ctx.fig_dir / "anomaly_example.png",
                                            title="Simulated lesions drawn into a real held-out scan")
                result.figures.append(ctx.figure("anomaly", "Example of simulated lesions", path))
        return result


TASK = AnomalyTask()

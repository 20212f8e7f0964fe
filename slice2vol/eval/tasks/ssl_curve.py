"""Learning curves of self-supervised encoders: probe metric against pretraining steps.

For every native-3D set that comes from an SSL run (an ``encoders3d`` entry with ``ssl:``, or a
``checkpoint:`` inside a run folder), every checkpoint the run kept (``train.keep_every``, listed by
:func:`slice2vol.ssl.export.list_checkpoints`) — plus the random initialisation the run started
from, rebuilt from its seed — embeds the cohort exactly as the main 3D set was embedded, and the
probe tasks (``linear`` by default) score it on the benchmark's shared splits, with paired tests
against the reference set. The curve shows where each method is heading and which step, if any,
crosses the reference.

Rows and paired rows have the usual shapes with ``task: ssl_curve``, ``encoder`` = the entry name,
``variant`` = ``<probe>:<variant>@step=<N>`` and an extra ``step``; one figure per label.

Options (the ``ssl_curve:`` block of an experiment config)::

    ssl_curve:
      probes: [linear]          # probe tasks to run per checkpoint (linear, knn)
      entries: null             # 3D entry names (default: every SSL set)
      labels: null              # default: every label
      include_init: true        # step 0 = the run's random initialisation
      max_points: 0             # keep at most this many checkpoints, evenly spaced (0 = all)

Embeddings are written to ``<out>/ssl_curve/<entry>.h5`` (one set per step, keyed by the weights'
sha256), so a rerun only probes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from slice2vol.eval.cohort import safe_name
from slice2vol.eval.tasks.base import Task, TaskContext, TaskResult

log = logging.getLogger(__name__)

DEFAULTS = {"probes": ["linear"], "entries": None, "labels": None, "include_init": True, "max_points": 0}


def _options(ctx: TaskContext) -> dict:
    params = ctx.params("ssl_curve")
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"ssl_curve: unknown option(s) {unknown}; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **params}


def run_dir_of(es, base: Path) -> Path | None:
    """The SSL run folder a 3D set was embedded from (its checkpoint's parent), or None."""
    from slice2vol.eval.experiment import expand

    candidates = [es.provenance.get("checkpoint")]
    entry = es.entry
    if getattr(entry, "checkpoint", None):
        candidates.append(expand(entry.checkpoint, base))
    for value in candidates:
        if not value:
            continue
        path = Path(value)
        for folder in (path, path.parent):
            if (folder / "last" / "meta.json").exists() or any(folder.glob("step_*/meta.json")):
                return folder
    return None


def _thin(points: list, max_points: int) -> list:
    """At most ``max_points`` items, evenly spaced, first and last kept."""
    if not max_points or len(points) <= max_points:
        return points
    keep = sorted({int(round(i)) for i in np.linspace(0, len(points) - 1, max_points)})
    return [points[i] for i in keep]


def _init_encoder(run_dir: Path):
    """The encoder a run started from: its method rebuilt with the run's seed (``pretrain`` seeds, then builds)."""
    import hashlib
    import json

    from slice2vol.config import from_dict, to_dict
    from slice2vol.ssl import SSLConfig, build_method
    from slice2vol.ssl.trainer import resolve_checkpoint, seed_everything

    meta = json.loads((resolve_checkpoint(run_dir) / "meta.json").read_text())
    cfg = from_dict(SSLConfig, meta["config"])
    seed_everything(cfg.train.seed)
    encoder = build_method(cfg).encoder.eval()
    digest = hashlib.sha256()
    for name, value in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    encoder.slice2vol_meta = {"config": to_dict(cfg), "method": cfg.method, "key": f"ssl3d/{cfg.method}",
                              "step": 0, "checkpoint": None, "weights_sha256": "init:" + digest.hexdigest(),
                              "config_hash": meta.get("config_hash")}
    return encoder


def curve_sets(ctx: TaskContext, es, run_dir: Path, opts: dict) -> list[tuple[int, Any]]:
    """(step, :class:`~slice2vol.eval.sets.EmbeddingSet`) for every kept checkpoint of ``run_dir``."""
    from slice2vol.cache import FeatureStore
    from slice2vol.eval.sets import EmbeddingSet
    from slice2vol.ssl.export import embed_cohort, list_checkpoints, load_encoder

    points: list[tuple[int, Any]] = list(list_checkpoints(run_dir))
    if opts["include_init"] and all(step != 0 for step, _ in points):
        points.insert(0, (0, None))
    points = _thin(points, int(opts["max_points"]))
    store_path = ctx.out / "ssl_curve" / f"{safe_name(es.name)}.h5"
    store_path.parent.mkdir(parents=True, exist_ok=True)
    input_size = tuple(getattr(es.entry, "input_size", None) or es.provenance.get("input_size") or (64, 64, 64))
    out = []
    for step, ckpt in points:
        encoder = _init_encoder(run_dir) if ckpt is None else load_encoder(ckpt)
        sha = encoder.slice2vol_meta.get("weights_sha256", "")
        if sha and sha == es.provenance.get("weights_sha256") and list(input_size) == list(
                es.provenance.get("input_size", [])):
            out.append((step, dataclasses.replace(es, name=f"{es.name}@{step}")))  # the main set itself
            continue
        name = f"step_{step:07d}"
        store = FeatureStore(store_path, mode="r")  # the main file and/or its committed parts
        have = bool(store.segment_paths()) and name in store.volume_embedding_names()
        if have and store.volume_embeddings(name)[2].get("weights_sha256") != sha:
            have = False  # a rerun of the SSL run changed this step's weights
        if not have:
            t0 = time.time()
            embed_cohort(encoder, ctx.cohort, store_path, name, input_size=input_size, progress=ctx.progress,
                         write_labels=False)
            ctx.timings[f"ssl_curve:{es.name}@{step}"] = round(time.time() - t0, 2)
        ids, X, prov = FeatureStore(store_path, mode="r").volume_embeddings(name)
        # the checkpoints of one run share its pretraining subjects: same disclosure as the main set
        out.append((step, EmbeddingSet(f"{es.name}@{step}", list(ids), X, {**prov, "store": str(store_path)}, "3d",
                                       es.entry, fitted=getattr(es, "fitted", None),
                                       pretraining=getattr(es, "pretraining", None),
                                       fit_subjects=list(getattr(es, "fit_subjects", []) or []))))
    return out


class SSLCurveTask(Task):
    name = "ssl_curve"

    def run(self, ctx: TaskContext) -> TaskResult:
        from slice2vol.eval.nested import FoldFittedSet
        from slice2vol.eval.tasks import get_task

        opts = _options(ctx)
        result = TaskResult()
        wanted = opts["entries"]
        frames = {k: v for k, v in ctx.frames.items() if not opts["labels"] or k in opts["labels"]}
        probes = [get_task(p) for p in opts["probes"]]
        reference_rows: list[dict] = []
        for name, es in ctx.sets.items():
            if es.kind != "3d" or (wanted and name not in wanted):
                continue
            # a set fitted per training fold has one run per fold, not one curve
            run_dir = None if isinstance(es, FoldFittedSet) else run_dir_of(es, ctx.base)
            if run_dir is None:
                if wanted:
                    result.skipped.append({"name": f"ssl_curve: {name}", "substitute": None,
                                           "reason": "not one SSL run folder (no last/ or step_*/ checkpoints, "
                                                     "or pretrained anew on every training fold)"})
                continue
            points = curve_sets(ctx, es, run_dir, opts)
            if len(points) < 2:
                result.skipped.append({"name": f"ssl_curve: {name}", "substitute": None,
                                       "reason": "one checkpoint only: set train.keep_every in the SSL config"})
                continue
            sets = {s.name: s for _, s in points}
            steps = {s.name: step for step, s in points}
            reference = ctx.reference if ctx.reference in ctx.sets and ctx.reference != name else None
            if reference:
                sets[reference] = ctx.sets[reference]
            sub = dataclasses.replace(ctx, sets=sets, frames=frames, reference=reference)
            for probe in probes:
                res = probe.run(sub)
                for row in res.rows:
                    if row["encoder"] in steps:
                        result.rows.append(self._retag(row, probe.name, name, steps[row["encoder"]]))
                    elif row["encoder"] == reference:
                        reference_rows.append({**row, "probe": probe.name})
                for row in res.paired:
                    if row["encoder"] in steps:
                        result.paired.append(self._retag(row, probe.name, name, steps[row["encoder"]]))
                result.skipped += res.skipped
            result.extras[name] = {"run_dir": str(run_dir), "steps": sorted(steps.values()),
                                   "probes": [p.name for p in probes]}
        if result.rows:
            result.figures += self._figures(ctx, result.rows, reference_rows, frames, probes)
        return result

    @staticmethod
    def _retag(row: dict, probe: str, entry: str, step: int) -> dict:
        return {**row, "task": "ssl_curve", "encoder": entry, "variant": f"{probe}:{row['variant']}@step={step}",
                "step": step}

    def _figures(self, ctx: TaskContext, rows: list[dict], reference_rows: list[dict], frames: dict,
                 probes) -> list[dict]:
        """One figure per label: the primary metric against steps, one panel per probe."""
        from slice2vol.eval.estimates import primary_metric
        from slice2vol.eval.plots import _plt, save_figure  # the report's figure conventions

        plt = _plt()
        figures = []
        for label, frame in frames.items():
            metric = primary_metric(frame.kind)
            fig, axes = plt.subplots(1, len(probes), figsize=(5.2 * len(probes), 3.6), squeeze=False)
            for ax, probe in zip(axes[0], probes):
                variant = probe.primary_variant(ctx, frame.kind)
                mine = [r for r in rows if r["label"] == label and r["metric"] == metric
                        and r["variant"].startswith(f"{probe.name}:{variant}@")]
                for entry in sorted({r["encoder"] for r in mine}):
                    pts = sorted((r["step"], r["estimate"], r["ci_low"], r["ci_high"]) for r in mine
                                 if r["encoder"] == entry)
                    s, e, lo, hi = map(np.asarray, zip(*pts))
                    ax.plot(s, e, marker="o", label=entry)
                    ax.fill_between(s, lo, hi, alpha=0.15)
                ref_row = next((r for r in reference_rows if (r["probe"], r["label"], r["metric"], r["variant"])
                                == (probe.name, label, metric, variant)), None)
                if ref_row is not None:
                    ax.axhline(ref_row["estimate"], color="k", ls="--", lw=1, label=f"{ctx.reference} (reference)")
                    ax.axhspan(ref_row["ci_low"], ref_row["ci_high"], color="k", alpha=0.06)
                ax.set_xlabel("pretraining step")
                ax.set_ylabel(f"{metric} ({probe.name}: {variant})")
                ax.set_title(f"{label}")
            handles, names = axes[0][0].get_legend_handles_labels()
            fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(names)),
                       frameon=False)
            png, svg = save_figure(fig, ctx.fig_dir / f"ssl_curve_{safe_name(label)}.png")
            figures.append(ctx.figure("ssl_curve", f"{label}: {metric} of the {', '.join(p.name for p in probes)} "
                                      "probe against pretraining steps (95% bootstrap CI band; dashed: reference)",
                                      png, svg))
        return figures


TASK = SSLCurveTask()

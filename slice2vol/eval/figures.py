"""Figures of the probe tasks: score bars with intervals per label, embedding maps (UMAP / t-SNE).

Drawing goes through :mod:`slice2vol.eval.plots`; this module only chooses what to draw.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

from slice2vol.eval.cohort import safe_name
from slice2vol.eval.estimates import primary_metric
from slice2vol.eval.metrics import LOWER_IS_BETTER

log = logging.getLogger(__name__)


def probe_figures(ctx, rows: Sequence[Mapping]) -> list[dict]:
    """Bars of every probe's primary metric per label, then one embedding grid per projection method."""
    from slice2vol.eval import plots

    from slice2vol.eval.tasks import get_task

    figures: list[dict] = []
    for label, kind in ctx.label_types.items():
        metric = primary_metric(kind)
        # one panel per probe, its primary variant (the one its paired tests use); every variant is in the tables
        primary = {}
        for task in ("knn", "linear"):
            try:
                primary[task] = str(get_task(task).primary_variant(ctx, kind))
            except Exception:  # a task that cannot say: show all its variants
                primary[task] = None
        chosen = [{**r, "probe": f"{r['task']}: {r['variant']}"} for r in rows
                  if r["label"] == label and r["metric"] == metric and r["task"] in primary
                  and (primary[r["task"]] is None or str(r["variant"]) == primary[r["task"]])]
        if not chosen:
            continue
        pretty = metric.upper().replace("ROC_AUC", "ROC AUC")
        kinds = sorted({r["estimate_kind"].replace("_", " ") for r in chosen})
        path = plots.score_panels(chosen, ctx.fig_dir / f"bars_{safe_name(label)}.png", panel_key="probe",
                                  title=f"{label}: {pretty} (95% bootstrap CI)", metric_label=pretty,
                                  chance=0.5 if metric == "roc_auc" else None, reference=ctx.reference,
                                  lower_is_better=metric in LOWER_IS_BETTER)
        figures.append(ctx.figure("probes", f"{label} ({kind}): {pretty} of every set under each probe's primary "
                                  f"variant, {' / '.join(kinds)} estimate with subject-level bootstrap 95% "
                                  f"interval (the reference darker, its value dotted)", path))
    emb = {n: (es.ids, es.X) for n, es in ctx.sets.items() if es.X is not None and es.kind != "chance"
           and es.X.shape[1] >= 2}
    if emb:
        for method in ctx.cfg.plots:
            try:
                path = plots.embedding_grid(emb, ctx.labels, ctx.label_types, method, ctx.fig_dir / f"{method}.png",
                                            seed=ctx.cfg.seed, cache_dir=ctx.out / "cache")
                figures.append(ctx.figure("embeddings", f"{method.upper()} of the volume embeddings of each set "
                                          "(columns), coloured by each label (rows)", path))
            except Exception as err:  # a projection failure must not lose the rest of the report
                log.warning("%s projection failed: %s", method, err)
    return figures

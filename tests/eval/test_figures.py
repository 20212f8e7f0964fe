"""The probe bar figure shows each probe's primary variant of every set, in panels, readable at any size."""

from __future__ import annotations

import types

import matplotlib.image as mpimg

from slice2vol.eval import plots
from slice2vol.eval.figures import probe_figures


def _rows():
    rows = []
    for enc, auc in (("ref", 0.9), ("other", 0.7), ("chance", 0.5)):
        for task, variants in (("knn", ["k=10 weighted", "k=5 mean"]), ("linear", ["logistic", "logistic-l1"])):
            for v in variants:
                rows.append({"task": task, "label": "sex", "encoder": enc, "variant": v, "metric": "roc_auc",
                             "estimate": auc, "ci_low": auc - 0.05, "ci_high": auc + 0.05, "estimate_kind": "fold_mean"})
    return rows


def test_probe_figures_draw_primary_variants_only(tmp_path, monkeypatch):
    seen = {}

    def fake(rows, path, **kw):
        seen["rows"], seen["kw"] = rows, kw
        return path

    monkeypatch.setattr(plots, "score_panels", fake)
    ctx = types.SimpleNamespace(label_types={"sex": "categorical"}, reference="ref", sets={}, fig_dir=tmp_path,
                                cfg=types.SimpleNamespace(primary_k=10, plots=[], seed=0, knn=types.SimpleNamespace(ks=[5, 10])),
                                figure=lambda *a: a)
    probe_figures(ctx, _rows())
    assert sorted({r["probe"] for r in seen["rows"]}) == ["knn: k=10 weighted", "linear: logistic"]
    assert len(seen["rows"]) == 6 and seen["kw"]["reference"] == "ref"


def test_score_panels_grow_with_the_number_of_sets(tmp_path):
    rows = [{**r, "probe": f"{r['task']}: {r['variant']}"} for r in _rows() if r["variant"] in ("k=10 weighted", "logistic")]
    many = [{**r, "encoder": f"{r['encoder']}{i}"} for i in range(5) for r in rows]
    small = mpimg.imread(plots.score_panels(rows, tmp_path / "a.png", title="t", reference="ref"))
    big = mpimg.imread(plots.score_panels(many, tmp_path / "b.png", title="t", reference="ref0"))
    # one row per set: 15 sets make a taller figure than 3, at the same width (two panels)
    assert big.shape[0] > 2 * small.shape[0] and big.shape[1] == small.shape[1]


def test_grouped_bars_without_any_bar_draw_without_a_legend_warning(tmp_path):
    """Fuzz round 15: every set skipped left matplotlib's 'No artists with labels' warning on stderr."""
    import warnings

    from slice2vol.eval.probe_plots import grouped_bars

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = grouped_bars([], tmp_path / "bars.png", groups=["core"], sets=[], kinds={}, title="t", ylabel="Dice")
    assert (tmp_path / "bars.png").exists() and path is not None

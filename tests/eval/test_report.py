"""Report files: every table and figure, machine-readable results with config and provenance."""

from __future__ import annotations

import csv
import json

import numpy as np

from slice2vol.eval import plots
from slice2vol.eval.report import write_report


def _rows():
    rows = []
    for task, label, metric in [("knn", "sex", "roc_auc"), ("linear", "sex", "roc_auc"), ("linear", "age", "mae"),
                                ("segmentation", "ventricles", "dice"), ("anomaly", "subject-level", "auroc")]:
        for enc in ("imagenet", "random"):
            rows.append({"task": task, "label": label, "encoder": enc, "variant": "v", "metric": metric,
                         "mean": 0.7, "sd": 0.05, "point": 0.71, "ci_low": 0.6, "ci_high": 0.8, "n_subjects": 48,
                         "n_folds": 5, "n_repeats": 2})
    return rows


def test_write_report_has_every_table_and_figure(tmp_path):
    rows = _rows()
    bars = plots.score_bars(rows[:4], tmp_path / "figures" / "bars.png", title="t", group_key="task")
    rng = np.random.default_rng(0)
    overlay = plots.segmentation_overlay(rng.random((20, 24)), rng.integers(0, 3, (20, 24)),
                                         {"imagenet": rng.integers(0, 3, (20, 24))}, ["gm", "wm"],
                                         tmp_path / "figures" / "overlay.png")
    figures = [("Bars of sex", bars), ("Overlay", overlay)]
    paired = [{"task": "knn", "label": "sex", "variant": "v", "metric": "roc_auc", "encoder": "random",
               "reference": "imagenet", "delta": -0.2, "ci_low": -0.3, "ci_high": -0.1, "p_value": 0.002,
               "n_subjects": 48}]
    config = {"name": "x", "splits": {"n_folds": 5}}
    provenance = {"weights_sha256": "abc123", "versions": {"numpy": np.__version__}}
    paths = write_report(tmp_path, title="T", rows=rows, paired=paired, figures=figures, config=config,
                         provenance=provenance, notes=["protocol note"])
    for name in ("report.html", "report.md", "results.csv", "paired.csv", "results.json"):
        assert paths[name].exists() and paths[name].stat().st_size > 0
    html = paths["report.html"].read_text()
    md = paths["report.md"].read_text()
    for title in ("knn — sex", "linear — sex", "linear — age", "segmentation — ventricles", "anomaly — subject-level"):
        assert title in html and title in md
    assert html.count("data:image/png;base64,") == 2  # self-contained
    assert "figures/bars.png" in md and "figures/overlay.png" in md
    assert "Paired comparisons" in html and "0.0020" in html and "abc123" in html and "protocol note" in md
    with open(paths["results.csv"]) as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows) and float(table[0]["ci_low"]) == 0.6
    data = json.loads(paths["results.json"].read_text())
    assert data["config"] == config and data["provenance"]["weights_sha256"] == "abc123"
    assert len(data["results"]) == len(rows) and data["paired"][0]["p_value"] == 0.002
    assert [f["path"] for f in data["figures"]] == ["figures/bars.png", "figures/overlay.png"]


def test_missing_figure_is_reported_not_fatal(tmp_path):
    paths = write_report(tmp_path, title="T", rows=_rows(), paired=[], figures=[("gone", tmp_path / "nope.png")],
                         config={}, provenance={})
    assert "missing figure" in paths["report.html"].read_text()


def test_projection_handles_degenerate_and_caches(tmp_path):
    assert np.all(plots.project_2d(np.ones((10, 5)), "tsne") == 0)
    x = np.random.default_rng(0).normal(size=(12, 6))
    a = plots.project_2d(x, "tsne", cache_dir=tmp_path)
    assert a.shape == (12, 2) and len(list(tmp_path.glob("tsne-*.npy"))) == 1
    np.testing.assert_array_equal(plots.project_2d(x, "tsne", cache_dir=tmp_path), a)

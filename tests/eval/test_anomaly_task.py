"""The anomaly task end to end on a small cohort: sets, the four levels, the paired design, the sweep,
paired tests between sets, figures, feature files shared with the segmentation task, cached rerun."""

from __future__ import annotations

import numpy as np
import pytest

from tests.eval.test_segmentation_task import context, small  # noqa: F401  (fixture)

ANOMALY = {"n_folds": 2, "scorer": {"levels": [0, 1], "per_subject": 100},
           "variants": {"patchcore": {}, "patchcore+position": {"position_weight": 0.2}},
           "lesions": {"n_lesions": [1, 1], "radius_mm": [10.0, 12.0], "contrast": [0.8, 0.8], "sign": "hypo"},
           "sweep": {"contrasts": [0.0, 0.8], "radii_mm": [6.0, 12.0], "sign": "hypo"}}

LABELS = {"pixel-level", "pixel-level (pooled voxels)", "region-level (lesions detected at 1% voxel FPR)",
          "slice-level", "subject-level", "subject-level (paired: lesioned > own healthy)"}


def test_anomaly_task_levels_sweep_paired_and_cached_rerun(small, tmp_path, monkeypatch):  # noqa: F811
    from slice2vol.eval import dense_bench
    from slice2vol.eval.tasks import get_task

    cohort, weights = small
    ctx = context(tmp_path, cohort, weights, tasks=("segmentation", "anomaly"), anomaly=ANOMALY)
    extracted = []
    real_ensure = dense_bench.DenseFeatureFiles.ensure

    def counting_ensure(self, subjects, load, progress=False):
        extracted.extend((self.pset.name, s.subject_id) for s in subjects if not self.path(s.subject_id).exists())
        return real_ensure(self, subjects, load, progress)

    monkeypatch.setattr(dense_bench.DenseFeatureFiles, "ensure", counting_ensure)
    seg = get_task("segmentation").run(ctx)
    n_after_seg = len(extracted)
    res = get_task("anomaly").run(ctx)
    assert not res.skipped, res.skipped
    # the encoder's features were extracted once for both tasks; only the anomaly control is new
    assert {name for name, _ in extracted[n_after_seg:]} == {"control:intensity"}
    assert not list((ctx.out / "cache" / "dense").glob("*/*.npz"))  # removed after the last probe task
    names = {"cnn", "cnn:random-init", "control:intensity"}
    for variant in ("patchcore", "patchcore+position"):
        got = {(r["encoder"], r["label"]) for r in res.rows if r["variant"] == variant}
        assert got == {(n, lab) for n in names for lab in LABELS}
    for r in res.rows:
        assert r["ci_low"] <= r["estimate"] <= r["ci_high"] or not np.isfinite(r["ci_low"]), r
        assert 0 <= r["estimate"] <= 1
    pairs = {(p["encoder"], p["reference"]) for p in res.paired}
    assert {("cnn", "cnn:random-init"), ("cnn", "control:intensity"), ("cnn:random-init", "control:intensity")} <= pairs
    assert all(p["label"] == "pixel-level" and p["variant"] == "patchcore" for p in res.paired)
    sweep = res.extras["sweep"]["control:intensity"]["patchcore"]
    assert set(sweep) == {"c0.00-r6mm", "c0.00-r12mm", "c0.80-r6mm", "c0.80-r12mm"}
    # a contrast-0 "lesion" changes nothing: detection at the 1% FPR threshold stays near 1%
    assert sweep["c0.00-r12mm"]["detection_rate"] <= 0.25
    per = res.extras["per_subject"]["control:intensity|patchcore"]
    assert len(per["pixel_auroc"]) == len(cohort.subjects) == len(per["healthy"])
    # lesion-wise sensitivity: all lesions detected over all lesions, not a mean of per-subject rates
    (det,) = [r for r in res.rows if r["encoder"] == "control:intensity" and r["variant"] == "patchcore"
              and r["metric"] == "detection_rate"]
    assert det["estimate"] == sum(per["detected"]) / sum(per["n_lesions"])
    assert det["n_events"] == sum(per["n_lesions"])
    assert len(res.figures) == 4 and all((ctx.out / f["png"]).exists() for f in res.figures)
    assert seg.rows and "lesions" in res.extras and "1-1 lesion(s)" in res.extras["lesions"]["description"]
    # docs/probes.md's tables are printed from results.json by readme_tables.py --probes: Dice and HD95
    # of every variant, the anomaly levels and the sweep
    from tests.test_reproduce import _load

    results = {"rows": seg.rows + res.rows, "paired": seg.paired + res.paired,
               "tasks": {"segmentation": seg.extras, "anomaly": res.extras}}
    printed = _load("readme_tables").probe_tables(results)
    heads = [line for line in printed.splitlines() if line.startswith("| segmentation ")]
    assert len(heads) == 3, heads  # Dice of multilayer and linear, HD95 of the primary (hd95: primary)
    assert "| segmentation multilayer (HD95 mm, median over subjects [95% CI]) |" in printed
    assert printed.index("segmentation multilayer (Dice") < printed.index("segmentation linear (Dice")
    assert printed.count("| control:intensity | ") == 3  # its own row in the primary Dice and HD95, and anomaly
    c = sweep["c0.80-r12mm"]
    assert (f"| control:intensity, \\|c\\| 0.8 | {sweep['c0.80-r6mm']['pixel_auroc']:.2f} / "
            f"{sweep['c0.80-r6mm']['detection_rate']:.2f} | {c['pixel_auroc']:.2f} / {c['detection_rate']:.2f} |"
            in printed), printed

    def no_extraction(*args, **kwargs):
        raise AssertionError("a cached rerun must not extract features")

    monkeypatch.setattr(dense_bench.DenseFeatureFiles, "ensure", no_extraction)
    again = get_task("anomaly").run(context(tmp_path, cohort, weights, tasks=("segmentation", "anomaly"),
                                            anomaly=ANOMALY))
    assert [r["estimate"] for r in again.rows] == [r["estimate"] for r in res.rows]


def test_pooled_rates_and_pooled_fold_values_against_hand_and_sklearn():
    from sklearn.metrics import roc_auc_score

    from slice2vol.eval.dense_bench import _pooled_auroc
    from slice2vol.eval.tasks.anomaly import _ratio_row

    # 4 of 6 lesions found; the mean of per-subject rates would say (1 + 0 + 0.75) / 3 = 0.58
    row = _ratio_row("anomaly", "region", "enc", "v", "detection_rate", [1, 0, 3, 0], [1, 1, 4, 0],
                     np.array([0, 0, 1, 1]), 2, 200, 0)
    assert row["estimate"] == 4 / 6 and row["n_subjects"] == 3 and row["n_events"] == 6
    assert row["fold_mean"] == (1 / 2 + 3 / 4) / 2 and row["fold_sd"] == np.std([0.5, 0.75], ddof=1)
    assert 0 <= row["ci_low"] <= row["estimate"] <= row["ci_high"] <= 1
    # the pooled-voxel AUROC of each test fold, not a per-subject fold mean
    rng = np.random.default_rng(0)
    owner = np.repeat(np.arange(4), 50)
    truth = rng.random(200) < 0.2
    scores = rng.normal(size=200) + truth * (1 + owner)
    pooled = _pooled_auroc(scores, truth, owner, 4, 32, 50, 0, tests=[np.array([0, 2]), np.array([1, 3])])
    assert pooled["estimate"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    for test, got in zip(([0, 2], [1, 3]), pooled["fold_values"]):
        sel = np.isin(owner, test)
        assert got == pytest.approx(roc_auc_score(truth[sel], scores[sel]), abs=1e-12)

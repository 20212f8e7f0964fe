"""End to end: ``slice2vol bench`` on the CI config (tiny cohort, tiny encoder), then a cached rerun."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tests._tiny_encoder  # noqa: F401  - registers test/tiny_cnn
from slice2vol.cli import main
from slice2vol.eval.runner import expand, load_experiment
from tests.conftest import write_nifti

REPO = Path(__file__).resolve().parents[2]


def blob_cohort(root: Path, n: int = 12, shape=(24, 28, 20)) -> Path:
    """Ellipsoid heads whose bright core (seg 2) is larger for ``grp`` = 1; ``score`` tracks its size."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(0))
    rows = []
    for i in range(n):
        grp = i % 2
        core = 0.35 + 0.2 * grp + rng.uniform(-0.05, 0.05)
        vol = np.where(radius < 0.9, 40.0, 0.0) + np.where(radius < core, 60.0, 0.0) + rng.normal(0, 2, shape)
        seg = np.where(radius < core, 2, np.where(radius < 0.9, 1, 0)).astype(np.int16)
        write_nifti(root / f"s{i}.nii.gz", vol.astype(np.float32))
        write_nifti(root / f"s{i}_seg.nii.gz", seg)
        rows.append({"subject_id": f"s{i:02d}", "t1": f"s{i}.nii.gz", "seg": f"s{i}_seg.nii.gz", "grp": grp,
                     "score": round(core * 10, 3)})
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


OVERRIDES = [
    "cohort.labels=[grp,score]",
    "encoders=[{name: tiny, key: test/tiny_cnn, weights: random, dtype: float32, aggregators: [mean, max]}]",
    "segmentation.structures={outer: [1], core: [2]}",
    "segmentation.epochs=10",
    "anomaly.max_subjects=8",
    "splits.n_folds=3",
]


def test_bench_end_to_end_and_cached_rerun(tmp_path, capsys):
    manifest = blob_cohort(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["bench", "--config", str(REPO / "configs/experiments/ci.yaml"), "--out", str(out), "--no-progress",
            f"cohort.manifest={manifest}", *OVERRIDES]
    assert main(argv) == 0
    for name in ("report.html", "report.md", "results.csv", "paired.csv", "results.json"):
        assert (out / name).exists()
    data = json.loads((out / "results.json").read_text())
    rows = data.get("rows", data.get("results"))
    tasks = {(r["task"], r["label"]) for r in rows}
    assert {("knn", "grp"), ("linear", "grp"), ("knn", "score"), ("linear", "score"), ("segmentation", "outer"),
            ("segmentation", "core"), ("anomaly", "subject-level"), ("anomaly", "slice-level")} <= tasks
    assert set(data["sets"]) == {"tiny/mean", "tiny/max"}
    assert data["reference"] == "tiny/mean" and data["schema"] == "slice2vol.results/2"
    assert {p["encoder"] for p in data["paired"]} == {"tiny/max"}
    assert all(0 <= p["p_value"] <= p["p_holm"] <= 1 for p in data["paired"])
    for r in rows:  # both estimators in every row, the headline says which
        assert {"pooled", "fold_mean", "estimate", "estimate_kind"} <= set(r)
        assert r["estimate"] == r[r["estimate_kind"]]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(data["figures"]) >= 7
    # the bright, larger core is an easy signal for the linear probe
    auc = [r["estimate"] for r in rows if r["task"] == "linear" and r["label"] == "grp" and r["metric"] == "roc_auc"]
    assert min(auc) > 0.8
    core = [r["estimate"] for r in rows if r["task"] == "segmentation" and r["label"] == "core"]
    assert min(core) > 0.3
    # same splits file for every encoder, subject-level
    splits = json.loads((out / "splits" / "grp.json").read_text())
    assert sorted(splits["subject_ids"]) == [f"s{i:02d}" for i in range(12)]
    # rerun: everything cached, identical numbers
    t0 = time.time()
    assert main(argv) == 0
    rerun = json.loads((out / "results.json").read_text())
    assert time.time() - t0 < 20
    rerun_rows = rerun.get("rows", rerun.get("results"))
    assert [r["estimate"] for r in rerun_rows] == [r["estimate"] for r in rows]
    assert rerun["provenance"]["timings_s"]["task:knn"] + rerun["provenance"]["timings_s"]["task:linear"] < 5


def test_config_errors_are_clear(tmp_path):
    assert main(["bench", "--config", str(REPO / "configs/experiments/ci.yaml"), "--out", str(tmp_path),
                 "tasks=[knn,clustering]"]) == 2
    with pytest.raises(ValueError, match="unknown task"):
        load_experiment(REPO / "configs/experiments/ci.yaml", ["tasks=[clustering]"])


def test_expand_env_and_relative(monkeypatch, tmp_path):
    monkeypatch.setenv("S2V_TEST_DIR", str(tmp_path))
    assert expand("${S2V_TEST_DIR}/x.csv") == f"{tmp_path}/x.csv"
    monkeypatch.delenv("S2V_TEST_DIR")
    assert expand("${S2V_TEST_DIR:-data}/x.csv", tmp_path) == str(tmp_path / "data" / "x.csv")
    assert expand("random", tmp_path) == "random"


@pytest.mark.parametrize("name", ["ci", "demo", "ixi"])
def test_shipped_configs_load(name):
    cfg, base = load_experiment(REPO / "configs" / "experiments" / f"{name}.yaml")
    assert base == REPO and cfg.encoders

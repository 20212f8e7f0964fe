"""Nested evaluation and the leakage guard, on pure-noise slice features with real-sized cohorts.

Acceptance of the benchmark protocol: attention-MIL fitted inside the folds scores at chance on
noise; the same aggregator fitted on every subject with the labels would score near 1 (shown by
bypassing the guard), and ``bench`` refuses such a set in one line naming it and the overlap.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slice2vol.cache import FeatureStore, PlaneFeatures, SubjectFeatures
from slice2vol.cli import main
from tests.conftest import write_nifti

REPO = Path(__file__).resolve().parents[2]
N = 48


#: a ball of radius 3 voxels in the 8^3 grid (22% of it)
BALL = np.sum((np.indices((8, 8, 8)) - 3.5) ** 2, axis=0) <= 9


def noise_cohort(root: Path, n: int = N, dim: int = 16, seed: int = 0) -> tuple[Path, Path]:
    """A manifest of ``n`` tiny volumes with a balanced ``sex`` label, and a store of pure-noise slice features."""
    rng = np.random.default_rng(seed)
    sex = np.array(["F", "M"])[rng.permutation(np.arange(n) % 2)]
    rows, subjects = [], []
    for i in range(n):
        sid = f"sub-{i:02d}"
        # a ball of noise in air (a grid of noise alone is refused: no background around a head);
        # 16 mm across: 8 mm is no head (field-of-view check)
        write_nifti(root / f"{sid}.nii.gz", np.where(BALL, rng.normal(size=(8, 8, 8)) + 10, 0).astype(np.float32),
                    np.diag([2.0, 2.0, 2.0, 1.0]))
        rows.append({"subject_id": sid, "t1": f"{sid}.nii.gz", "sex": sex[i], "age": 20.0 + i})
        planes = {}
        for p, axis in (("axial", 2), ("coronal", 1)):
            s = int(rng.integers(8, 12))
            positions = np.zeros((s, 3))
            positions[:, axis] = np.arange(s) * 4.0
            planes[p] = PlaneFeatures(rng.normal(size=(s, dim)).astype(np.float32), np.arange(s), positions)
        subjects.append(SubjectFeatures(sid, planes, {"sex": sex[i]}))
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    store = FeatureStore(root / "noise.h5", mode="a")
    with store.writer_lock():
        store.commit_subjects(subjects, {"encoder": "noise"}, dtype="float32", label_types={"sex": "categorical"})
    return manifest, root / "noise.h5"


def bench_argv(manifest: Path, store: Path, out: Path, *extra: str) -> list[str]:
    return ["bench", "--config", str(REPO / "configs/experiments/ci.yaml"), "--out", str(out), "--no-progress",
            f"cohort.manifest={manifest}", "cohort.labels=[sex]", "tasks=[knn,linear]",
            f"encoders=[{{name: noise, store: {store}, aggregators: [mean, mil]}}]",
            "encoders.0.aggregator_params={mil: {hidden: 16, attn_dim: 8, epochs: 15, lr: 0.003}}",
            "splits={n_folds: 5, n_repeats: 1, seed: 0, n_bins: 2}", "baselines.chance=false",
            "n_bootstrap=100", "n_permutations=100", "plots=[]", "reference=noise/mean", *extra]


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    return noise_cohort(tmp_path_factory.mktemp("noise"))


def test_mil_fitted_inside_folds_scores_at_chance(noise, tmp_path):
    manifest, store = noise
    assert main(bench_argv(manifest, store, tmp_path / "run")) == 0
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    mil = [r for r in data["rows"] if r["encoder"] == "noise/mil" and r["metric"] == "roc_auc"]
    assert {r["task"] for r in mil} == {"knn", "linear"}
    for r in mil:
        assert 0.25 < r["fold_mean"] < 0.75 and 0.25 < r["pooled"] < 0.75, r
        assert r["ci_low"] < 0.5 < r["ci_high"], r
    fitted = data["sets"]["noise/mil"]["fitted"]
    assert fitted["scope"] == "inside folds" and fitted["labels"] == ["sex"]
    assert data["sets"]["noise/mean"]["fitted"] is None
    # the MIL set joined the paired tests against the reference like any other set
    assert {(p["task"], p["encoder"]) for p in data["paired"]} >= {("knn", "noise/mil"), ("linear", "noise/mil")}
    assert all(p["p_value"] <= p["p_holm"] <= 1 for p in data["paired"])
    # the report shows who fitted the set, next to both estimators
    html = (tmp_path / "run" / "report.html").read_text()
    assert "mil aggregator, supervised on the evaluated label on sex (inside folds)" in html


def test_the_same_mil_fitted_on_all_subjects_leaks(noise, tmp_path):
    """Why the guard exists: fitted with every subject's label, MIL 'predicts' noise almost perfectly."""
    from slice2vol.aggregate import aggregate_store
    from slice2vol.eval.experiment import ExperimentConfig
    from slice2vol.eval.knn import KNNConfig
    from slice2vol.eval.linear import LinearConfig
    from slice2vol.eval.runner import EmbeddingSet, evaluate_sets
    from slice2vol.eval.splits import SplitConfig

    manifest, copy = noise_cohort(tmp_path)  # the same noise, in a store of its own
    name = aggregate_store(copy, "mil", label="sex", train_ids="all", name="mil-all", plot=False, hidden=16,
                           attn_dim=8, epochs=60, lr=0.003)
    ids, X, _ = FeatureStore(copy).volume_embeddings(name)
    labels = pd.read_csv(manifest).set_index("subject_id")
    cfg = ExperimentConfig(tasks=["linear"], splits=SplitConfig(n_folds=5), knn=KNNConfig(ks=(5,)), primary_k=5,
                           linear=LinearConfig(Cs=(0.01, 1.0, 100.0)), n_bootstrap=20, n_permutations=10)
    ev = evaluate_sets({"leaky": EmbeddingSet("leaky", ids, X)}, labels, {"sex": "categorical"}, cfg, tmp_path)
    auc = [r for r in ev["rows"] if r["metric"] == "roc_auc"][0]
    assert auc["pooled"] > 0.85 and auc["fold_mean"] > 0.85  # fitted inside folds: ~0.5 (test above)


def test_bench_refuses_a_set_fitted_with_labels_on_test_subjects(noise, tmp_path, capsys):
    manifest, store = noise
    argv = bench_argv(manifest, store, tmp_path / "leak",
                      "encoders.0.aggregator_params={mil: {train_ids: all, label: sex, hidden: 8, epochs: 2}}")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "'noise/mil'" in err[0] and "48 subjects, 48 of them test subjects" in err[0]
    assert not (tmp_path / "leak" / "results.json").exists()


def test_a_store_entry_whose_key_is_not_the_stores_encoder_is_refused(noise, tmp_path, capsys):
    """The report used to name the entry's key (tv/mobilenet_v2) for features another encoder made."""
    manifest, store = noise
    argv = bench_argv(manifest, store, tmp_path / "run", "tasks=[knn]")
    argv = [a.replace("{name: noise, store:", "{name: noise, key: tv/mobilenet_v2, store:") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("noise.h5: encoders entry 'noise' says key 'tv/mobilenet_v2', but the store holds 'noise' "
                        "features; drop 'key' from the entry (the store says which encoder made it) or point 'store' "
                        "at a cache of that encoder")


def test_damaged_rows_and_a_damaged_set_in_a_store_do_not_end_the_run(tmp_path, capsys):
    """A damaged `mean` set is aggregated again from the slice features, and a subject whose rows fail
    their checksum is left out and reported (exit 1); both used to end the run with exit 2."""
    import h5py

    manifest, store = noise_cohort(tmp_path)
    FeatureStore(store, mode="a").write_volume_embeddings("mean", [f"sub-{i:02d}" for i in range(N)],
                                                          np.ones((N, 3), np.float32), {"aggregator": "mean"})
    with h5py.File(store, "a") as f:
        f["volumes/mean/X"][0, 0] += 1
        f["planes/axial/features"][0, 0] += 1  # sub-00's first axial row
    argv = bench_argv(manifest, store, tmp_path / "run", "tasks=[knn]", "encoders.0.aggregators=[mean]")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "subject 'sub-00' axial" in err and "fail their checksum" in err
    ids, X, _ = FeatureStore(store).volume_embeddings("mean")
    assert "sub-00" not in ids and len(ids) == N - 1 and X.shape[1] == 16


def test_a_read_only_store_is_aggregated_for_the_run_only(tmp_path, capsys):
    """bench wrote its sets into the entry's store, so a shared or read-only store failed ('no permission
    to write in its folder')."""
    import subprocess

    manifest, mine = noise_cohort(tmp_path / "ro")
    writer = FeatureStore(mine, mode="a")
    with writer.writer_lock():
        writer.compact()  # one file, as a shared store would be
    before = mine.read_bytes()
    if subprocess.run(["chattr", "+i", str(mine)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i needs root (CAP_LINUX_IMMUTABLE) and a file system with attributes")
    try:
        argv = bench_argv(manifest, mine, tmp_path / "run", "tasks=[knn]", "encoders.0.aggregators=[mean, max]")
        assert main(argv) == 0
    finally:
        subprocess.run(["chattr", "-i", str(mine)], check=True)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"noise/mean", "noise/max"} <= set(results["sets"]) and results["rows"]
    assert mine.read_bytes() == before  # untouched
    # the same numbers as aggregating the store itself (an independent path: aggregate_store)
    from slice2vol.aggregate import aggregate_store, load_bags

    ids, bags = load_bags(FeatureStore(mine))
    expected = np.stack([np.concatenate([b[p].features for p in b]).mean(0) for b in bags])
    aggregate_store(mine, "mean", plot=False)
    np.testing.assert_allclose(FeatureStore(mine).volume_embeddings("mean")[1], expected, rtol=1e-5)


def test_a_fold_whose_fitted_model_collapsed_is_disclosed(noise, caplog):
    """A trainable aggregator that maps every subject of a fold to one vector scores at chance there;
    the set's disclosure and the report name the fold, so the chance row is not read as "no signal"."""
    from types import SimpleNamespace

    from slice2vol.eval.nested import FoldFittedAggregator
    from slice2vol.eval.report import _describe_fitted

    _, store = noise
    ids = FeatureStore(store, mode="r").subjects()[:6]

    class Collapsing(FoldFittedAggregator):
        def fit_embed(self, train_ids, y_train, test_ids, kind, seed, label=None):
            return np.ones((len(train_ids), 4), np.float32), np.ones((len(test_ids), 4), np.float32)

    es = Collapsing("noise/mil", store, "mil", {"hidden": 8, "attn_dim": 4}, ids=ids)
    frame = SimpleNamespace(ids=ids, y=np.arange(6) % 2, label="sex", kind="categorical")
    fold = SimpleNamespace(train=ids[:4], test=ids[4:], repeat=0, fold=1)
    with caplog.at_level("WARNING"):
        es.fold_features(frame, fold)
    assert es.fitted["collapsed_folds"] == ["sex repeat 0 fold 1"]
    assert "gave all 6 subjects the same embedding" in caplog.text
    assert "COLLAPSED in 1 fold(s) (sex repeat 0 fold 1)" in _describe_fitted(es.fitted)
    # a fold whose embeddings differ is not noted; the real aggregator's inputs do differ
    assert es.inputs_vary(ids)
    ok = FoldFittedAggregator("noise/mil", store, "mil", {"hidden": 8, "attn_dim": 4, "epochs": 2}, ids=ids)
    ok.fold_features(frame, fold)
    assert "collapsed_folds" not in ok.fitted

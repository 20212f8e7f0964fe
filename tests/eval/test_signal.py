"""Known signal -> k-NN and linear probes well above chance; shuffled labels -> chance."""

from __future__ import annotations

import numpy as np
import pandas as pd

from slice2vol.eval.runner import EmbeddingSet, ExperimentConfig, evaluate_sets
from slice2vol.eval.splits import SplitConfig
from slice2vol.eval.knn import KNNConfig
from slice2vol.eval.linear import LinearConfig

N, D = 60, 32


def cohort(seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"sub-{i:03d}" for i in range(N)]
    dx = np.array(["CN", "AD"])[np.arange(N) % 2]
    age = rng.uniform(20, 80, N)
    signal = rng.normal(size=(N, D))
    signal[:, :4] += 2.0 * (dx == "AD")[:, None]  # class signal
    signal[:, 4:8] += ((age - 50) / 10)[:, None]  # age signal
    noise = rng.normal(size=(N, D))
    labels = pd.DataFrame({"dx": dx, "age": age}, index=pd.Index(ids, name="subject_id"))
    sets = {"signal": EmbeddingSet("signal", ids, signal.astype(np.float32)),
            "noise": EmbeddingSet("noise", ids[::-1], noise[::-1].astype(np.float32))}  # other row order
    return sets, labels


def config():
    return ExperimentConfig(tasks=["knn", "linear"], splits=SplitConfig(n_folds=5, n_repeats=1),
                            knn=KNNConfig(ks=(5, 10)), primary_k=10,
                            linear=LinearConfig(Cs=(0.01, 0.1, 1.0), alphas=(1.0, 10.0, 100.0)),
                            n_bootstrap=50, n_permutations=50, reference="noise")


def pick(rows, encoder, label, task, metric):
    return [r for r in rows if r["encoder"] == encoder and r["label"] == label and r["task"] == task
            and r["metric"] == metric]


def test_probes_find_signal_and_paired_test(tmp_path):
    sets, labels = cohort()
    ev = evaluate_sets(sets, labels, {"dx": "categorical", "age": "continuous"}, config(), tmp_path)
    for task in ("knn", "linear"):
        for r in pick(ev["rows"], "signal", "dx", task, "roc_auc"):
            assert r["estimate"] > 0.9, r
        for r in pick(ev["rows"], "noise", "dx", task, "roc_auc"):
            assert 0.25 < r["estimate"] < 0.75, r
        for r in pick(ev["rows"], "signal", "age", task, "pearson_r"):
            assert r["estimate"] > 0.7, r
        for r in pick(ev["rows"], "noise", "age", task, "pearson_r"):
            assert abs(r["estimate"]) < 0.35, r
    # the same saved splits serve both encoders; paired tests favour the signal
    assert len(list(tmp_path.glob("dx-*.json"))) == 1 and len(list(tmp_path.glob("age-*.json"))) == 1
    auc_tests = [p for p in ev["paired"] if p["label"] == "dx"]
    assert {p["variant"] for p in auc_tests} == {"k=10 weighted", "logistic"}
    for p in auc_tests:
        assert p["encoder"] == "signal" and p["reference"] == "noise"
        assert p["delta"] > 0.2 and p["p_value"] < 0.05
    mae_tests = [p for p in ev["paired"] if p["label"] == "age"]
    assert all(p["delta"] < 0 and p["metric"] == "mae" for p in mae_tests)


def test_shuffled_labels_score_at_chance(tmp_path):
    sets, labels = cohort()
    rng = np.random.default_rng(5)
    shuffled = labels.copy()
    shuffled["dx"] = rng.permutation(labels["dx"].to_numpy())
    shuffled["age"] = rng.permutation(labels["age"].to_numpy())
    ev = evaluate_sets({"signal": sets["signal"]}, shuffled, {"dx": "categorical", "age": "continuous"}, config(),
                       tmp_path)
    for task in ("knn", "linear"):
        for r in pick(ev["rows"], "signal", "dx", task, "roc_auc"):
            # both estimators near chance (fold-mean AUC has sd ~0.1 here: five folds of 12 subjects)
            assert 0.25 < r["fold_mean"] < 0.75 and 0.25 < r["pooled"] < 0.75, r
            assert r["pooled_ci_low"] < 0.5 < r["pooled_ci_high"] or abs(r["pooled"] - 0.5) < 0.15
        for r in pick(ev["rows"], "signal", "age", task, "r2"):
            assert r["pooled"] < 0.1, r

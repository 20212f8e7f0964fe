"""The public API: the README example runs as written; evaluate() against scikit-learn; lazy imports."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import slice2vol as s2v
from tests.conftest import write_nifti

REPO = Path(__file__).resolve().parents[1]


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README: no python block under '## Python API'"
    return match.group(1)


def _lesion_cohort(root: Path, n: int = 12, shape=(24, 28, 20)) -> Path:
    """Ellipsoid heads; ``lesion`` = 1 subjects carry a dark blob in the 'white matter'."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(0))
    rows = []
    for i in range(n):
        lesion = i % 2
        vol = np.where(radius < 0.9, 60.0, 0.0) + np.where(radius < 0.4, 30.0, 0.0) + rng.normal(0, 2, shape)
        if lesion:
            centre = rng.uniform(-0.3, 0.3, 3)
            blob = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0)) < 0.3
            vol[blob] = 10.0
        write_nifti(root / f"s{i}.nii.gz", vol.astype(np.float32))
        rows.append({"subject_id": f"s{i:02d}", "t1": f"s{i}.nii.gz", "lesion": lesion})
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    _lesion_cohort(tmp_path / "runs" / "cohort")
    monkeypatch.chdir(tmp_path)
    code = _readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the documented example itself
    table = namespace["table"]
    assert {"probe", "variant", "metric", "estimate", "ci_low", "ci_high", "fold_sd"} <= set(table.columns)
    primary = table[table.primary]
    assert set(primary.metric) == {"roc_auc"} and set(primary.probe) == {"knn", "linear"}
    assert (primary.ci_low <= primary.estimate).all() and (primary.estimate <= primary.ci_high).all()
    # 12 subjects, every one predicted once per repeat
    assert set(table.n_subjects) == {12}
    assert "roc_auc" in capsys.readouterr().out
    assert (tmp_path / "runs" / "api" / "mnv2.h5").exists()
    # a second run resumes the same store (same seeded random network) and gives the same table
    again: dict = {}
    exec(compile(code, "README.md", "exec"), again)  # noqa: S102
    pd.testing.assert_frame_equal(again["table"], table)


def _signal(n=60, d=16, seed=0, strength=1.5):
    rng = np.random.default_rng(seed)
    y = np.array(["a", "b"] * (n // 2))
    X = rng.normal(size=(n, d)).astype(np.float32)
    X[y == "b", :3] += strength
    return X, y


def test_evaluate_separates_signal_from_noise():
    X, y = _signal()
    noise = np.random.default_rng(1).normal(size=X.shape).astype(np.float32)
    from slice2vol.eval.linear import LinearConfig

    table = s2v.evaluate({"signal": X, "noise": noise}, y, ks=(5,), n_folds=4, n_repeats=1, n_bootstrap=200,
                         n_permutations=200, linear=LinearConfig(Cs=(0.01, 1.0), inner_folds=2))
    auc = table[(table.metric == "roc_auc") & (table.probe == "linear")].set_index("encoder")
    assert auc.loc["signal", "estimate"] > 0.85 and auc.loc["noise", "ci_low"] < 0.5 < auc.loc["noise", "ci_high"]
    # the noise set is compared with the reference (the first set) on the same subjects and splits
    assert auc.loc["noise", "delta"] < 0 and auc.loc["noise", "delta_ci_high"] < 0
    assert auc.loc["noise", "p_value"] < 0.05 and auc.loc["signal", "delta"] == 0.0
    assert table.attrs["kind"] == "categorical" and table.attrs["classes"] == ["a", "b"]
    # 2 sets x (k-NN weighted + majority, linear) x 4 metrics
    assert len(table) == 2 * 3 * 4


def test_evaluate_knn_matches_scikit_learn_on_the_same_folds():
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

    X, y = _signal(n=40, strength=0.8)
    table = s2v.evaluate(X, y, probes=["knn"], ks=(5,), n_folds=4, n_bootstrap=50)
    pred = np.empty(len(y), dtype=object)
    ids = [str(i) for i in range(len(y))]
    for fold in table.attrs["folds"]:
        te = np.array([ids.index(s) for s in fold["test"]])
        tr = np.setdiff1d(np.arange(len(y)), te)
        pred[te] = KNeighborsClassifier(5, metric="cosine").fit(X[tr], y[tr]).predict(X[te])
    ours = table[(table.variant == "k=5 majority") & (table.metric == "accuracy")].estimate.item()
    assert ours == pytest.approx(np.mean(pred == y))

    rng = np.random.default_rng(3)
    target = X[:, 0] * 2 + rng.normal(0, 0.3, len(X))
    table = s2v.evaluate(X, target, probes=["knn"], ks=(5,), n_folds=4, n_bootstrap=50, kind="continuous")
    out = np.empty(len(y))
    for fold in table.attrs["folds"]:
        te = np.array([ids.index(s) for s in fold["test"]])
        tr = np.setdiff1d(np.arange(len(y)), te)
        out[te] = KNeighborsRegressor(5, metric="cosine").fit(X[tr], target[tr]).predict(X[te])
    ours = table[(table.variant == "k=5 mean") & (table.metric == "mae")].estimate.item()
    assert ours == pytest.approx(np.mean(np.abs(out - target)))


def test_evaluate_is_subject_level_and_checks_input():
    X, y = _signal(n=20)
    with pytest.raises(ValueError, match="more than once"):
        s2v.evaluate(X, y, ids=["s0"] * 2 + [f"s{i}" for i in range(2, 20)], n_folds=4)
    with pytest.raises(ValueError, match=r"must be \(N, D\)"):
        s2v.evaluate(X[0], y[:1])
    with pytest.raises(ValueError, match="y has 19 values for 20 rows"):
        s2v.evaluate(X, y[:19])
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        s2v.evaluate(bad, y)
    with pytest.raises(ValueError, match="one class"):
        s2v.evaluate(X, ["a"] * 20)
    # 0 permutations gave every p-value 1.0 ("not significant" where nothing was tested)
    with pytest.raises(ValueError, match=r"^evaluate: n_permutations must be a whole number >= 1, got 0$"):
        s2v.evaluate(X, y, n_permutations=0)
    with pytest.raises(ValueError, match=r"^evaluate: n_bootstrap must be a whole number >= 1, got 0$"):
        s2v.evaluate(X, y, n_bootstrap=0)
    # missing targets are dropped, not predicted
    series = pd.Series(list(y[:18]) + [None, None], index=[f"sub{i}" for i in range(20)])
    table = s2v.evaluate(X, series, n_folds=3, n_bootstrap=20)
    assert set(table.n_subjects) == {18}
    assert all(s.startswith("sub") for f in table.attrs["folds"] for s in f["test"])


def test_load_cohort_reads_files_and_folders(tmp_path):
    manifest = _lesion_cohort(tmp_path / "c", n=4)
    assert len(s2v.load_cohort(manifest)) == 4
    assert len(s2v.load_cohort(tmp_path / "c")) == 4  # the folder's manifest.csv
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        s2v.load_cohort(tmp_path / "nope.csv")


def test_import_is_light():
    """``import slice2vol`` must not pull torch, numpy-heavy stacks or h5py (CLI start-up time)."""
    code = ("import sys, slice2vol; heavy = [m for m in ('torch', 'h5py', 'pandas', 'sklearn', 'timm') "
            "if m in sys.modules]; print(heavy); assert not heavy, heavy; "
            "assert callable(slice2vol.evaluate) and slice2vol.FeatureStore.__name__ == 'FeatureStore'")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
    assert set(s2v.__all__) >= {"load_cohort", "build_encoder", "cache_cohort", "FeatureStore", "aggregate",
                                "evaluate"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        s2v.nope  # noqa: B018


def test_aggregate_is_callable_whether_or_not_the_subpackage_was_imported(tmp_path):
    """``slice2vol.aggregate`` is the aggregation subpackage and the API function at once."""
    code = f"""
import numpy as np
import slice2vol.aggregate.store   # the subpackage first: Python binds it to slice2vol.aggregate
import slice2vol as s2v
assert s2v.aggregate.aggregate_store is slice2vol.aggregate.store.aggregate_store
for _ in range(2):  # the call reaches aggregate_store (which refuses the missing store), twice
    try:
        s2v.aggregate("missing.h5", "mean")
    except TypeError:
        raise
    except Exception as err:
        assert "missing.h5" in str(err), err
    else:
        raise AssertionError("aggregate of a missing store returned instead of refusing it")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
    import slice2vol.aggregate  # noqa: F401

    assert callable(s2v.aggregate) and hasattr(s2v.aggregate, "AGGREGATORS")


def test_random_encoder_is_seeded():
    """A rerun of the README example must rebuild the same random network (else its store refuses it)."""
    from slice2vol.extract import state_sha256

    first = state_sha256(s2v.build_encoder("tv/mobilenet_v2", weights="random", img_size=32))
    assert state_sha256(s2v.build_encoder("tv/mobilenet_v2", weights="random", img_size=32)) == first
    assert state_sha256(s2v.build_encoder("tv/mobilenet_v2", weights="random", img_size=32, seed=1)) != first


def test_evaluate_takes_one_probe_as_a_string():
    """``probes="knn"`` used to be refused as the probes ['k', 'n', 'n']."""
    X, y = _signal()
    table = s2v.evaluate(X, y, probes="knn", ks=(5,), n_folds=4, n_repeats=1, n_bootstrap=50)
    assert set(table.probe) == {"knn"}


def test_evaluate_clips_k_to_the_smallest_training_fold_and_names_the_k_used(caplog):
    """12 subjects in 4 folds train on 9: k=50 is the 9-NN in every fold, named k=9 (as the bench
    does), and equals asking for k=9; a bad level or k is refused before any fitting."""
    X, y = _signal(n=12)
    with caplog.at_level("WARNING"):
        big = s2v.evaluate(X, y, probes=["knn"], ks=(50,), n_folds=4, n_bootstrap=20)
    assert set(big.variant) == {"k=9 weighted", "k=9 majority"}
    assert "k=50 -> k=9" in caplog.text
    nine = s2v.evaluate(X, y, probes=["knn"], ks=(9,), n_folds=4, n_bootstrap=20)
    pd.testing.assert_frame_equal(big, nine)
    with pytest.raises(ValueError, match=r"confidence level must be a number strictly between 0 and 1.*got 2\.0"):
        s2v.evaluate(X, y, level=2.0)
    with pytest.raises(ValueError, match=r"evaluate: ks must be whole numbers >= 1, got \[0\]"):
        s2v.evaluate(X, y, ks=(0,))


def test_evaluate_gives_the_linear_probe_the_groups_of_its_training_rows(monkeypatch):
    """With groups, the penalty is chosen on inner folds that keep groups whole (fuzz round 14)."""
    from slice2vol.eval import linear

    X, y = _signal(n=24)
    groups = [f"g{i // 2}" for i in range(24)]
    seen = []
    real_fit = linear.LinearProbe.fit

    def spy(self, x, target, groups=None):
        seen.append((np.asarray(x), groups))
        return real_fit(self, x, target, groups=groups)

    monkeypatch.setattr(linear.LinearProbe, "fit", spy)
    s2v.evaluate(X, y, groups=groups, probes="linear", n_folds=3, n_bootstrap=20)
    row_group = {tuple(np.round(X[i], 6)): groups[i] for i in range(24)}
    assert seen
    for x, given in seen:  # each training row's own group, in row order
        assert list(given) == [row_group[tuple(np.round(row, 6))] for row in x]

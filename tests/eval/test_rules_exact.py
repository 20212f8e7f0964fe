"""Exact values of the benchmark's small rules: confidence levels, inner folds, disclosures, the
cohort's size rules and its synthetic-cohort reuse (each once held only loosely by the suite)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from slice2vol.eval.cohort import make_label_splits, resolve_cohort
from slice2vol.eval.experiment import CohortSection, ExperimentConfig
from slice2vol.eval.leakage import describe, disclosure_from_provenance, pretraining_disclosure
from slice2vol.eval.linear import _inner_splits
from slice2vol.eval.metrics import bootstrap_ci, check_level
from slice2vol.eval.splits import SplitConfig
from tests.conftest import blob_volume, write_nifti


@pytest.mark.parametrize("level", [0.0, 1.0, -0.1, 1.5, float("nan"), "x", None])
def test_a_confidence_level_outside_0_1_is_refused(level):
    """1.0 would give a (min, max) "100%" interval; the level must lie strictly between 0 and 1."""
    with pytest.raises(ValueError, match=r"strictly between 0 and 1"):
        check_level(level)
    with pytest.raises(ValueError, match=r"strictly between 0 and 1"):
        bootstrap_ci(np.arange(10.0), np.arange(10.0), "mae", level=level)
    assert check_level(0.95) == 0.95 and check_level("0.9") == 0.9


def test_inner_folds_are_capped_by_the_smallest_class():
    """Two members of a class can be in two inner folds only: with 3 asked, 2 are made, and every
    validation part holds both classes (StratifiedKFold's own warning about it is silenced)."""
    y = np.array(["a"] * 2 + ["b"] * 10)
    splits = _inner_splits(y, 3, True, 0)
    assert len(splits) == 2
    for train, val in splits:
        assert set(y[val]) == {"a", "b"} and len(set(train) & set(val)) == 0
    assert len(_inner_splits(np.array(["a"] * 5 + ["b"] * 10), 3, True, 0)) == 3


def test_pretraining_disclosure_counts_the_fit_subjects_in_test_folds():
    assert pretraining_disclosure(["a", "b", "c", "c"], {"b", "z"}, "manifest m.csv") == {
        "n_subjects": 3, "n_in_test_folds": 1, "labels": False, "source": "manifest m.csv"}


def test_a_fine_tuning_record_counts_as_fitted_with_labels_only_when_supervised():
    """A self-supervised fine-tuning saw no labels even when its record names one (an older writer)."""
    fitted, pre, ids = disclosure_from_provenance({"trained_subjects": ["a", 2], "objective": "simclr",
                                                   "label": "sex"})
    assert fitted is None and ids == ["a", "2"]
    assert pre == {"what": "fine-tuned encoder (simclr)", "n_subjects": 2, "labels": False}
    fitted, pre, _ = disclosure_from_provenance({"trained_subjects": ["a"], "objective": "supervised", "label": "sex"})
    assert pre is None and fitted == {"what": "fine-tuned encoder", "labels": ["sex"], "scope": "all subjects",
                                      "n_subjects": 1}
    fitted, pre, _ = disclosure_from_provenance({"trained_subjects": ["a"], "objective": "supervised"})
    assert fitted is None and pre["labels"] is False


def test_the_disclosure_sentence_says_what_was_seen():
    assert describe("ft", {"pretraining": {"n_subjects": 5, "n_in_test_folds": 2, "labels": True,
                                           "source": "x.csv"}}) == (
        "ft: pretrained on 5 subjects, 2 of them in test folds, with labels (x.csv)")
    assert describe("ssl", {"pretraining": {"n_subjects": 5, "n_in_test_folds": 0, "labels": False,
                                            "source": "x.csv"}}) == (
        "ssl: pretrained on 5 subjects, 0 of them in test folds, no labels (x.csv)")
    assert describe("mil", {"fitted": {"what": "mil aggregator", "labels": ["sex"], "scope": "inside folds"}}) == (
        "mil: mil aggregator; fitted inside each training fold (labels seen: sex)")
    assert describe("pca", {"fitted": {"what": "pca", "labels": [], "scope": "all subjects"}}) == (
        "pca: pca; fitted on all subjects (no labels seen)")
    assert describe("plain", {}) == ""


IDS = [f"s{i:02d}" for i in range(40)]


def _splits(labels: pd.DataFrame, types: dict, tmp_path, n_folds: int):
    skipped: list[dict] = []
    cfg = ExperimentConfig(splits=SplitConfig(n_folds=n_folds))
    frames = make_label_splits(labels, types, [set(labels.index)], cfg, tmp_path, skipped)
    return frames, {s["name"]: s["reason"] for s in skipped}


@pytest.mark.parametrize("n_rare, kept", [(4, False), (5, True)])
def test_a_class_is_kept_from_n_folds_subjects_on(tmp_path, n_rare, kept):
    """With 5 folds, a class of 4 subjects cannot be in every test fold and is left out; one of 5 is kept."""
    ids = IDS[:20 + n_rare]
    labels = pd.DataFrame({"dx": ["A"] * 10 + ["B"] * 10 + ["C"] * n_rare}, index=ids)
    frames, skipped = _splits(labels, {"dx": "categorical"}, tmp_path, 5)
    assert ("C" in set(frames["dx"].classes)) is kept
    assert len(frames["dx"].ids) == (len(ids) if kept else 20)
    assert (f"label dx: class(es) 'C' ({n_rare})" in skipped) is not kept


@pytest.mark.parametrize("n, scored", [(9, False), (10, True)])
def test_a_label_needs_two_subjects_per_fold(tmp_path, n, scored):
    """5 folds need 10 subjects with a value: 9 are refused in words, 10 are scored."""
    labels = pd.DataFrame({"age": np.linspace(20, 80, n)}, index=IDS[:n])
    frames, skipped = _splits(labels, {"age": "continuous"}, tmp_path, 5)
    assert ("age" in frames) is scored
    if not scored:
        assert skipped["label age"] == (f"{n} subjects have a value and an embedding in every set ({n} have a value, "
                                        f"{n} are in every set): fewer than 2 x splits.n_folds = 10")


def _fake_cohort(calls: list):
    def make(target, n_subjects=4, **_):
        calls.append(n_subjects)
        target.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n_subjects):
            write_nifti(target / f"c{i}.nii.gz", blob_volume(seed=i))
            rows.append({"subject_id": f"c{i}", "t1": f"c{i}.nii.gz", "age": 20.0 + i})
        pd.DataFrame(rows).to_csv(target / "manifest.csv", index=False)
        return target / "manifest.csv"
    return make


def test_the_synthetic_cohort_is_rebuilt_when_its_parameters_change(tmp_path, monkeypatch):
    """The cohort built under <out>/cohort is reused only for the same parameters: 4 then 6 subjects
    gave the 4 again."""
    import slice2vol.data.synthetic as synthetic

    calls: list = []
    monkeypatch.setattr(synthetic, "make_cohort", _fake_cohort(calls))

    def cohort(n):
        return resolve_cohort(ExperimentConfig(cohort=CohortSection(synthetic={"n_subjects": n})), tmp_path,
                              tmp_path / "out")[0]

    assert len(cohort(4).ids) == 4 and calls == [4]
    assert len(cohort(4).ids) == 4 and calls == [4]  # the same parameters: reused
    assert len(cohort(6).ids) == 6 and calls == [4, 6]


def test_max_subjects_keeps_the_first_rows_in_manifest_order(tmp_path):
    rows = []
    for i, sid in enumerate(["z", "b", "m", "a"]):
        write_nifti(tmp_path / f"{sid}.nii.gz", blob_volume(seed=i))
        rows.append({"subject_id": sid, "t1": f"{sid}.nii.gz", "age": 30.0 + i})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    cfg = ExperimentConfig(cohort=CohortSection(manifest=str(tmp_path / "m.csv"), max_subjects=3))
    assert resolve_cohort(cfg, tmp_path, tmp_path / "out")[0].ids == ["z", "b", "m"]

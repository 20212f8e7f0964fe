"""Which labels and classes a benchmark scores (fuzz round 14: a messy cohort's label file).

Each rule is held against the frame it is given: classes too small for the folds, constant labels,
the grouping column, subjects without a group, and classes typed two ways.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from slice2vol.eval.cohort import make_label_splits
from slice2vol.eval.experiment import ExperimentConfig
from slice2vol.eval.splits import SplitConfig

IDS = [f"s{i:02d}" for i in range(16)]


def _frame(**columns) -> pd.DataFrame:
    return pd.DataFrame(columns, index=IDS)


def _run(labels, types, tmp_path, **split):
    skipped: list[dict] = []
    cfg = ExperimentConfig(splits=SplitConfig(n_folds=split.pop("n_folds", 2), **split))
    frames = make_label_splits(labels, types, [set(IDS)], cfg, tmp_path, skipped)
    return frames, {s["name"]: s["reason"] for s in skipped}


def test_a_stray_code_is_left_out_of_its_label_and_the_label_stays_binary(tmp_path, caplog):
    """'U' for one subject among M/F made sex a 3-class label (its 'roc_auc' a one-vs-rest mean)."""
    sex = ["M", "F"] * 7 + ["F", "U"]
    with caplog.at_level(logging.WARNING):
        frames, skipped = _run(_frame(sex=sex), {"sex": "categorical"}, tmp_path)
    frame = frames["sex"]
    assert list(frame.classes) == ["F", "M"] and "s15" not in frame.ids and len(frame.ids) == 15
    assert skipped == {"label sex: class(es) 'U' (1)": (
        "fewer than splits.n_folds = 2 subjects each; those subjects are left out of this label (a class no test "
        "fold can hold is no class the probes can be scored on: a stray code, a typo, free text)")}
    assert "label sex: class(es) 'U' (1) have fewer than splits.n_folds = 2 subjects" in caplog.text
    for fold in frame.splits.folds:  # every test fold holds both classes
        y = dict(zip(frame.ids, frame.y))
        assert {y[s] for s in fold.test} == {"F", "M"}


@pytest.mark.parametrize("values, reason", [
    ([f"free text {i}" for i in range(16)], "one class (none) among the 0 subjects in classes of at least "
                                            "splits.n_folds = 2 subjects"),
    (["F"] * 15 + ["M"], "one class (F) among the 15 subjects in classes of at least splits.n_folds = 2 subjects"),
])
def test_free_text_and_a_class_of_one_subject_skip_the_label(tmp_path, values, reason):
    """A free-text column and 15 F / 1 M were scored: AUC 0.5 [0.5, 0.5], a zero-width interval."""
    frames, skipped = _run(_frame(note=values), {"note": "categorical"}, tmp_path)
    assert frames == {} and skipped["label note"] == reason


def test_a_constant_continuous_label_is_skipped(tmp_path):
    """bmi = 22.5 for all gave MAE 0.0 [0, 0] for every encoder and for chance."""
    frames, skipped = _run(_frame(bmi=[22.5] * 16), {"bmi": "continuous"}, tmp_path)
    assert frames == {} and skipped["label bmi"].startswith("constant (22.5 for all 16 subjects have a value")


def test_the_group_column_is_not_scored_and_subjects_without_a_group_are_left_out(tmp_path, caplog):
    """site as splits.group was also probed (AUC 0.5: no test site is ever in training), and every
    empty site cell became the one group 'nan'."""
    site = [f"site{i % 4}" for i in range(14)] + [np.nan, ""]
    age = np.linspace(20, 80, 16)
    with caplog.at_level(logging.WARNING):
        frames, skipped = _run(_frame(site=site, age=age), {"site": "categorical", "age": "continuous"}, tmp_path,
                               group="site")
    assert skipped["label site"] == "it is the splits.group column: every test fold holds groups that no training fold has"
    assert set(frames) == {"age"} and set(frames["age"].ids) == set(IDS[:14])
    assert "label age: 2 subject(s) have no site value (e.g. s14, s15) and are left out of it" in caplog.text


def test_classes_typed_two_ways_are_warned(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        frames, _ = _run(_frame(sex=["M", "F", "m", "f"] * 4), {"sex": "categorical"}, tmp_path)
    assert len(frames["sex"].classes) == 4  # scored as written, but said
    assert "label sex: classes 'F' / 'f'; 'M' / 'm' differ only in case or spaces" in caplog.text


def test_a_group_holding_nearly_every_subject_skips_the_label(tmp_path):
    """site A for 15 subjects and B for 1: the fold testing A trains on one subject. The run stopped
    with scikit-learn's words; the label is now skipped with the group sizes (a tampered split file
    still stops the run: tests/eval/test_splits.py)."""
    frames, skipped = _run(_frame(site=["A"] * 15 + ["B"], age=np.linspace(20, 80, 16)),
                           {"age": "continuous"}, tmp_path, group="site")
    assert frames == {}
    assert skipped["label age"].startswith("splits.group='site' (label 'age'): repeat 0 fold ")
    assert "(subjects per group: A: 15, B: 1)" in skipped["label age"]

"""Subject-level splits: no subject straddles folds, slice-level splits are impossible, reuse."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slice2vol.eval.cohort import LabelSplits
from slice2vol.eval.experiment import ExperimentConfig
from slice2vol.eval.sets import EmbeddingSet
from slice2vol.eval.tasks import get_task
from slice2vol.eval.tasks.base import TaskContext
from slice2vol.eval.splits import Fold, SplitConfig, SplitError, SubjectSplits, load_or_make_splits, make_splits

IDS = [f"sub-{i:02d}" for i in range(30)]


@pytest.mark.parametrize("kind,y,groups", [
    ("categorical", np.array(["F", "M"] * 15), None),
    ("continuous", np.linspace(20, 80, 30), None),
    ("categorical", None, None),
    ("categorical", np.array(["a", "b", "c"] * 10), [f"site{i % 6}" for i in range(30)]),
    ("continuous", np.linspace(20, 80, 30), [f"fam{i // 3}" for i in range(30)]),
])
def test_no_subject_straddles_folds(kind, y, groups):
    cfg = SplitConfig(n_folds=5, n_repeats=3, seed=1)
    splits = make_splits(IDS, y, kind, groups=groups, cfg=cfg)
    assert len(splits.folds) == 15 and splits.n_repeats == 3
    for r in range(3):
        tested = []
        for fold in splits.repeat(r):
            assert not set(fold.train) & set(fold.test)
            assert sorted(fold.train + fold.test) == sorted(IDS)
            tested += fold.test
            if groups is not None:
                g = dict(zip(IDS, groups))
                assert not {g[s] for s in fold.train} & {g[s] for s in fold.test}
        assert sorted(tested) == sorted(IDS)  # every subject tested exactly once per repeat
    # repeats differ (different seeds)
    assert splits.repeat(0)[0].test != splits.repeat(1)[0].test


def test_stratification_balances_classes_and_bins():
    y = np.array(["F"] * 10 + ["M"] * 20)
    splits = make_splits(IDS, y, "categorical", cfg=SplitConfig(n_folds=5))
    lab = dict(zip(IDS, y))
    for fold in splits.folds:
        assert sorted(lab[s] for s in fold.test).count("F") == 2  # 10 F over 5 folds
    age = np.arange(30.0)
    splits = make_splits(IDS, age, "continuous", cfg=SplitConfig(n_folds=5, n_bins=3))
    ages = dict(zip(IDS, age))
    for fold in splits.folds:
        tested = [ages[s] for s in fold.test]
        assert min(tested) < 10 and max(tested) >= 20  # every fold spans young to old


def test_slice_level_split_is_impossible(tmp_path):
    slice_rows = [s for s in IDS[:6] for _ in range(4)]  # 4 slices per subject
    with pytest.raises(SplitError, match="not slices"):
        make_splits(slice_rows, None)
    splits = make_splits(IDS[:10], None, cfg=SplitConfig(n_folds=2))
    with pytest.raises(SplitError, match="more than once"):
        splits.positions([s for s in IDS[:10] for _ in range(3)], splits.folds[0])
    # the probe loop goes through positions(): a slice-level table cannot be evaluated
    ctx = TaskContext(cfg=ExperimentConfig(tasks=["knn"]), base=tmp_path, out=tmp_path)
    slice_ids = [s for s in IDS[:10] for _ in range(2)]
    bad = SubjectSplits(slice_ids, splits.folds, {})
    frame = LabelSplits("y", "continuous", slice_ids, np.zeros(20), None, bad, tmp_path / "y.json")
    with pytest.raises(SplitError):
        get_task("knn").evaluate_set(ctx, EmbeddingSet("x", slice_ids, np.zeros((20, 4))), frame)


def test_positions_map_ids_to_rows_and_detect_missing():
    splits = make_splits(IDS[:10], None, cfg=SplitConfig(n_folds=2, seed=3))
    rows = list(reversed(IDS[:10]))
    tr, te = splits.positions(rows, splits.folds[0])
    assert [rows[i] for i in tr] == splits.folds[0].train
    assert [rows[i] for i in te] == splits.folds[0].test
    with pytest.raises(SplitError, match="no feature row"):
        splits.positions(rows[:-1], splits.folds[0])


def test_saved_splits_are_reused(tmp_path):
    path = tmp_path / "sex.json"
    y = np.array(["F", "M"] * 15)
    first = load_or_make_splits(path, IDS, y, "categorical", cfg=SplitConfig(n_folds=3, seed=7))
    assert path.exists()
    # another encoder, rows in another order, other seed in the stratifier: same saved splits
    again = load_or_make_splits(path, list(reversed(IDS)), y[::-1], "categorical", cfg=SplitConfig(n_folds=3, seed=7))
    assert again.to_dict() == first.to_dict()
    loaded = SubjectSplits.load(path)
    assert loaded.to_dict() == first.to_dict()
    # a different subject set makes new splits
    other = load_or_make_splits(path, IDS[:-3], y[:-3], "categorical", cfg=SplitConfig(n_folds=3, seed=7))
    assert len(other.subject_ids) == 27


def test_too_few_subjects():
    with pytest.raises(SplitError, match="cannot make"):
        make_splits(IDS[:3], None, cfg=SplitConfig(n_folds=5))


def _frame_inputs(n=40):
    import pandas as pd

    ids = [f"sub-{i:02d}" for i in range(n)]
    labels = pd.DataFrame({"sex": ["F", "M"] * (n // 2), "age": np.linspace(20, 80, n),
                           "site": [f"site{i % 5}" for i in range(n)]}, index=pd.Index(ids, name="subject_id"))
    return ids, labels


@pytest.mark.parametrize("change", ["group", "bins", "label_values", "n_folds"])
def test_a_changed_split_definition_never_reuses_the_old_file(tmp_path, change):
    """The runner's path: another group column, bins, label values or fold count -> another file, new folds."""
    from slice2vol.eval.cohort import make_label_splits

    ids, labels = _frame_inputs()
    cfg = ExperimentConfig(splits=SplitConfig(n_folds=4, n_bins=4))
    first = make_label_splits(labels, {"age": "continuous"}, [set(ids)], cfg, tmp_path)["age"]
    if change == "group":
        cfg.splits.group = "site"
    elif change == "bins":
        cfg.splits.n_bins = 2
    elif change == "n_folds":
        cfg.splits.n_folds = 5
    else:
        labels = labels.assign(age=labels["age"][::-1].to_numpy())  # corrected ages
    second = make_label_splits(labels, {"age": "continuous"}, [set(ids)], cfg, tmp_path)["age"]
    assert second.path != first.path and first.path.exists()
    assert second.splits.meta["definition"] != first.splits.meta["definition"]
    if change == "group":
        site = dict(zip(ids, labels["site"]))
        for fold in second.splits.folds:  # the grouping is honoured, not the old ungrouped folds
            assert not {site[s] for s in fold.train} & {site[s] for s in fold.test}
    # the same definition again reuses its own file
    again = make_label_splits(labels, {"age": "continuous"}, [set(ids)], cfg, tmp_path)["age"]
    assert again.path == second.path and again.splits.to_dict() == second.splits.to_dict()


def test_one_split_file_per_label(tmp_path):
    from slice2vol.eval.cohort import make_label_splits

    ids, labels = _frame_inputs()
    cfg = ExperimentConfig(splits=SplitConfig(n_folds=4))
    frames = make_label_splits(labels, {"sex": "categorical", "age": "continuous"}, [set(ids)], cfg, tmp_path)
    assert frames["sex"].path != frames["age"].path
    assert frames["sex"].splits.meta["definition"]["label"] == "sex"


def test_same_path_other_definition_is_redrawn_not_reused(tmp_path):
    """Even at one fixed path (the segmentation/anomaly tasks), a saved split of another definition is replaced."""
    ids, labels = _frame_inputs()
    path = tmp_path / "s.json"
    plain = load_or_make_splits(path, ids, None, "categorical", cfg=SplitConfig(n_folds=4))
    grouped = load_or_make_splits(path, ids, None, "categorical", groups=labels["site"].to_numpy(),
                                  cfg=SplitConfig(n_folds=4, group="site"))
    assert grouped.meta["group"] == "site" and grouped.to_dict() != plain.to_dict()
    site = dict(zip(ids, labels["site"]))
    for fold in grouped.folds:
        assert not {site[s] for s in fold.train} & {site[s] for s in fold.test}
    # a file without a definition (older version) is not trusted either
    legacy = json.loads(path.read_text())
    legacy["meta"].pop("definition")
    path.write_text(json.dumps(legacy))
    again = load_or_make_splits(path, ids, None, "categorical", groups=labels["site"].to_numpy(),
                                cfg=SplitConfig(n_folds=4, group="site"))
    assert "definition" in again.meta


def test_a_group_column_that_is_missing_or_has_too_few_groups_is_named(tmp_path):
    """`splits.group=nocol` gave 'error: nocol' (a bare KeyError), too few groups scikit-learn's words."""
    from slice2vol.eval.cohort import make_label_splits

    ids, labels = _frame_inputs()
    cfg = ExperimentConfig(splits=SplitConfig(n_folds=4, group="nocol"))
    with pytest.raises(ValueError, match=r"^splits.group='nocol' is not a column of the manifest \(columns: .*site"):
        make_label_splits(labels, {"age": "continuous"}, [set(ids)], cfg, tmp_path)
    cfg = ExperimentConfig(splits=SplitConfig(n_folds=6, group="site"))  # 5 sites
    with pytest.raises(ValueError, match=r"^splits.group='site': 5 group\(s\) \(site0, site1, site2, site3, site4\) "
                                         r"cannot fill splits.n_folds=6 folds without splitting a group"):
        make_label_splits(labels, {"age": "continuous"}, [set(ids)], cfg, tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    ({"seed": -1}, r"splits.seed must be a whole number from 0 to 2\*\*32 - 1, got -1"),
    ({"seed": 2**32}, r"splits.seed must be a whole number from 0 to 2\*\*32 - 1, got 4294967296"),
    ({"seed": True}, r"splits.seed must be a whole number from 0 to 2\*\*32 - 1, got True"),
    # repeat r shuffles with seed + r
    ({"seed": 2**32 - 1, "n_repeats": 2},
     r"splits.seed \+ splits.n_repeats - 1 must be <= 2\*\*32 - 1 \(repeat r shuffles with seed \+ r\), "
     r"got seed=4294967295, n_repeats=2"),
])
def test_a_seed_numpy_cannot_take_is_refused_naming_the_key(kwargs, message):
    """``splits.seed=-1`` failed at the first split with numpy's "Seed must be between 0 and 2**32 - 1",
    naming no key (fuzz round 8, H8)."""
    with pytest.raises(ValueError, match=f"^{message}$"):
        SplitConfig(**kwargs)


def test_the_largest_seed_makes_splits():
    splits = make_splits(IDS[:10], None, cfg=SplitConfig(n_folds=2, seed=2**32 - 1))
    assert len(splits.folds) == 2


def _tampered(tmp_path, edit):
    """A saved split file edited by hand (``edit(data)``), loaded again."""
    splits = make_splits(IDS[:12], np.array(["F", "M"] * 6), "categorical", cfg=SplitConfig(n_folds=3, n_repeats=2))
    path = splits.save(tmp_path / "split.json")
    data = json.loads(path.read_text())
    edit(data["folds"])
    path.write_text(json.dumps(data))
    return path


def test_a_subject_in_train_and_test_of_a_saved_fold_is_refused_by_name(tmp_path):
    holder = {}

    def leak(folds):
        fold = folds[4]  # repeat 1, fold 1
        holder["s"] = fold["test"][0]
        fold["train"].append(holder["s"])

    path = _tampered(tmp_path, leak)
    with pytest.raises(SplitError, match=rf"repeat 1 fold 1: subject\(s\) in train and test: \['{holder['s']}'\]"):
        SubjectSplits.load(path)


def test_a_subject_no_saved_fold_tests_is_refused_by_name(tmp_path):
    """Moved from the test to the training part of its fold: every fold still covers every subject
    and none straddles, but the subject is never scored."""
    holder = {}

    def untest(folds):
        fold = folds[1]  # repeat 0, fold 1
        holder["s"] = fold["test"].pop(0)
        fold["train"].append(holder["s"])

    path = _tampered(tmp_path, untest)
    with pytest.raises(SplitError, match=rf"repeat 0: test folds do not partition .*never tested: \['{holder['s']}'\]"):
        SubjectSplits.load(path)


def test_a_subject_missing_from_a_saved_fold_is_refused_by_name(tmp_path):
    holder = {}

    def drop(folds):
        holder["s"] = folds[2]["train"].pop()

    path = _tampered(tmp_path, drop)
    missing = rf"repeat 0 fold 2: does not cover the subjects \(missing: \['{holder['s']}'\]"
    with pytest.raises(SplitError, match=missing):
        SubjectSplits.load(path)


def test_continuous_targets_are_stratified_by_quantile_bins():
    """12 subjects, values 0..11 in shuffled order, 3 bins: edges at the 1/3 and 2/3 quantiles (3.67, 7.33)
    give bins {0..3}, {4..7}, {8..11}, four subjects each; with 4 folds every test fold holds exactly one
    subject of each bin, in every repeat."""
    from slice2vol.eval.splits import stratification_labels

    values = np.random.default_rng(0).permutation(12).astype(float)
    np.testing.assert_array_equal(stratification_labels(values, "continuous", 3), values.astype(int) // 4)
    ids = [f"s{i:02d}" for i in range(12)]
    splits = make_splits(ids, values, "continuous", cfg=SplitConfig(n_folds=4, n_repeats=3, n_bins=3))
    bin_of = dict(zip(ids, values.astype(int) // 4))
    for fold in splits.folds:
        assert sorted(bin_of[s] for s in fold.test) == [0, 1, 2], (fold.repeat, fold.fold)


def test_a_repeat_that_splits_like_an_earlier_one_is_warned(caplog):
    """4 subjects of two classes in 2 stratified folds have 2 partitions: of 3 repeats, one must repeat
    an earlier one (pigeonhole), and fold-mean intervals would count it as new evidence."""
    from slice2vol.eval.splits import SplitConfig, _repeated_partitions, make_splits

    with caplog.at_level("WARNING", logger="slice2vol.eval.splits"):
        small = make_splits(["a", "b", "c", "d"], ["x", "x", "y", "y"], cfg=SplitConfig(n_folds=2, n_repeats=3))
    same = _repeated_partitions(small)
    assert same and all(q < r for r, q in same.items())
    assert [r.getMessage() for r in caplog.records if "exactly like an earlier repeat" in r.getMessage()]
    caplog.clear()
    with caplog.at_level("WARNING", logger="slice2vol.eval.splits"):
        big = make_splits([f"s{i}" for i in range(40)], ["x", "y"] * 20, cfg=SplitConfig(n_folds=5, n_repeats=3))
    assert _repeated_partitions(big) == {} and not caplog.records


@pytest.mark.parametrize("y, kind", [
    (np.array(["F", "M"] * 8), "categorical"),
    (np.linspace(20, 80, 16), "continuous"),
    (None, "categorical"),
])
def test_a_group_holding_nearly_every_subject_is_refused_naming_label_and_groups(y, kind):
    """16 subjects, site A with 1 and site B with 15, 2 folds: the fold testing B trained on one subject and
    the linear probe died with scikit-learn's "n_splits=2 greater than ... n_samples=1" (fuzzer)."""
    ids = IDS[:16]
    groups = ["A"] + ["B"] * 15
    cfg = SplitConfig(n_folds=2, group="site")
    with pytest.raises(SplitError, match=r"^splits.group='site' \(label 'age'\): repeat 0 fold \d has a training "
                                         r"part of 1 subject\(s\) \(subjects per group: B: 15, A: 1\); every fold "
                                         r"needs >= 2 training subjects and >= 1 test subject"):
        make_splits(ids, y, kind, groups=groups, cfg=cfg, label="age")


def test_a_saved_grouped_split_with_a_one_subject_training_part_is_refused_too(tmp_path):
    """A split file written before grouped folds were checked is not reused as it is."""
    from sklearn.model_selection import GroupKFold

    from slice2vol.eval.splits import split_definition

    ids, groups = IDS[:16], ["A"] + ["B"] * 15
    cfg = SplitConfig(n_folds=2, group="site")
    folds = [Fold(0, k, [ids[i] for i in tr], [ids[i] for i in te])
             for k, (tr, te) in enumerate(GroupKFold(2).split(np.zeros(16), groups=groups))]
    saved = SubjectSplits(list(ids), folds, {"definition": split_definition(ids, None, "categorical", groups, cfg)})
    saved.save(tmp_path / "s.json")
    with pytest.raises(SplitError, match=r"^splits.group='site': repeat 0 fold \d has a training part of 1 subject"):
        load_or_make_splits(tmp_path / "s.json", ids, None, "categorical", groups=groups, cfg=cfg)


def test_balanced_groups_pass_the_check_unchanged():
    """The check refuses only degenerate folds: the shuffled GroupKFold folds are those drawn before it."""
    groups = [f"site{i % 4}" for i in range(16)]
    splits = make_splits(IDS[:16], None, groups=groups, cfg=SplitConfig(n_folds=2, n_repeats=2, group="site"))
    assert all(len(f.train) == 8 and len(f.test) == 8 for f in splits.folds)


def test_a_subject_two_saved_test_folds_hold_is_refused_by_name(tmp_path):
    """Also put in a second fold's test part (and out of its training part): every fold still covers
    every subject and none straddles, but the subject is scored twice in the repeat."""
    holder = {}

    def twice(folds):
        s = holder["s"] = folds[0]["test"][0]  # repeat 0, fold 0
        folds[1]["train"].remove(s)
        folds[1]["test"].append(s)

    path = _tampered(tmp_path, twice)
    with pytest.raises(SplitError, match=rf"repeat 0: test folds do not partition .*never tested: \[\], "
                                         rf"tested more than once: \['{holder['s']}'\]"):
        SubjectSplits.load(path)


def test_continuous_targets_with_rare_bins_are_stratified_by_coarser_bins():
    """24 subjects, 3 folds, 10 bins of 2-3 subjects (fewer than the folds): the bins are merged to
    24 // (2 * 3) = 4 quartiles of 6, and every test fold holds 2 subjects of each quartile."""
    values = np.random.default_rng(1).permutation(24).astype(float)
    ids = [f"s{i:02d}" for i in range(24)]
    splits = make_splits(ids, values, "continuous", cfg=SplitConfig(n_folds=3, n_repeats=3, n_bins=10))
    quartile = dict(zip(ids, values.astype(int) // 6))
    for fold in splits.folds:
        assert sorted(quartile[s] for s in fold.test) == [0, 0, 1, 1, 2, 2, 3, 3], (fold.repeat, fold.fold)

"""Brought-in feature tables (fuzz rounds 6 and 7): subjects a table lacks (missing values, F11, or no
row at all, G3) shrank every set's comparison with a warning at most (exit 0); values beyond float32
became NaN in the probes (G8); a label copied into the table went unflagged (G11); complex X lost its
imaginary part and sklearn's small-class notes reached stderr as raw warnings (G13); IDs with spaces,
``;``-separated tables and repeated column names were misread (G14)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slice2vol.cli import main
from slice2vol.eval.baselines import read_features
from slice2vol.eval.experiment import FeaturesEntry
from tests.eval.test_runner import blob_cohort

REPO = Path(__file__).resolve().parents[2]
IDS = [f"s{i:02d}" for i in range(6)]


def argv(manifest: Path, out: Path, table: Path, *extra: str) -> list[str]:
    return ["bench", "--config", str(REPO / "configs/experiments/ci.yaml"), "--out", str(out), "--no-progress",
            f"cohort.manifest={manifest}", "cohort.labels=[grp]", "tasks=[linear]", "encoders=[]", "encoders3d=[]",
            "baselines={sets: [head_volume], chance: true}", f"features=[{{path: {table}, id_column: MRID}}]",
            "splits={n_folds: 3, n_repeats: 1, seed: 0, n_bins: 2}", "n_bootstrap=20", "n_permutations=10",
            "plots=[]", *extra]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return blob_cohort(tmp_path_factory.mktemp("blobs"))


def read(path: Path, ids=IDS, labels=None, **entry) -> object:
    return read_features(FeaturesEntry("x", str(path), id_column="MRID", **entry), path, list(ids), labels)


@pytest.mark.parametrize("gap,line", [
    ("nan", "no finite value in column(s) ['noise'] of features entry '{name}'; left out of every set's comparison"),
    # was exit 0 without a word: every set silently compared on the 10 subjects the table covers
    ("no_row", "no row for this subject in features entry '{name}'; left out of every set's comparison"),
], ids=["nan", "no_row"])
def test_subjects_a_table_lacks_are_failures_of_the_benchmark(manifest, tmp_path, capsys, gap, line):
    table = pd.read_csv(manifest.parent / "regions.csv")
    if gap == "nan":
        table.loc[[1, 4], "noise"] = float("nan")
    else:
        table = table.drop(index=[1, 4])
    path = tmp_path / f"regions_{gap}.csv"
    table.to_csv(path, index=False)
    out = tmp_path / "run"
    assert main(argv(manifest, out, path)) == 1  # was 0, with a warning line only
    err = capsys.readouterr().err
    for sid in ("s01", "s04"):
        assert f"{sid}: {path}: " + line.format(name=path.stem) in err
    data = json.loads((out / "results.json").read_text())
    # the comparison is paired: every set on the same 10 subjects, and the two are listed
    assert {r["n_subjects"] for r in data["rows"]} == {10}
    assert sum(path.stem in f for f in data["cohort"]["failures"]) == 2
    assert any(s["name"].startswith(f"{path.stem}: 2 subject(s) ['s01', 's04']") for s in data["skipped"])
    assert "nothing was skipped" not in (out / "report.html").read_text()


def test_a_column_without_any_value_is_refused_before_any_work(manifest, tmp_path, capsys):
    table = pd.read_csv(manifest.parent / "regions.csv")
    table["noise"] = float("nan")
    path = tmp_path / "regions_nan.csv"
    table.to_csv(path, index=False)
    out = tmp_path / "run"
    assert main(argv(manifest, out, path)) == 2  # was 1 with no result rows: "every task or label was skipped"
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{path}: column(s) ['noise'] hold no finite value for any of the 12 cohort subject(s) in "
                        "the file (features entry 'regions_nan'); drop them (exclude: [...])")
    assert "\n" not in err
    assert not (out / "stores").exists()  # refused before the image sets were built


def test_a_label_copied_into_the_table_is_flagged_by_the_benchmark(manifest, tmp_path, caplog):
    table = pd.read_csv(manifest.parent / "regions.csv")
    table["GRP"] = pd.read_csv(manifest).grp.to_numpy()
    path = tmp_path / "regions_leak.csv"
    table.to_csv(path, index=False)
    assert main(argv(manifest, tmp_path / "run", path)) == 0
    assert (f"{path}: column 'GRP' is named like the label 'grp' being probed (a copy of the answer); exclude it "
            "(features entry 'regions_leak': exclude: [GRP])") in caplog.text


def write(path: Path, columns: dict, ids=IDS) -> Path:
    """A CSV (``MRID`` + columns) or an .npz (``ids``, ``X`` with the columns side by side)."""
    if path.suffix == ".npz":
        np.savez(path, ids=np.array(ids), X=np.column_stack(list(columns.values())))
    else:
        pd.DataFrame({"MRID": ids, **columns}).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("suffix,names", [(".csv", "['a', 'b']"), (".npz", "['f0', 'f1']")], ids=["csv", "npz"])
def test_values_beyond_float32_are_refused_on_read(tmp_path, suffix, names):
    # finite in float64, inf in the float32 set: NaN in the probes, then sklearn's many-line "Input X contains NaN"
    path = write(tmp_path / f"huge{suffix}", {"a": np.full(6, 1e308), "b": np.arange(6) * 1e300 - 2e300})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow warnings reached stderr too
        with pytest.raises(ValueError) as err:
            read(path)
    assert str(err.value) == (f"{path}: column(s) {names} hold values beyond float32 (up to 1e+308); rescale them "
                              "(features entry 'x')")


def test_large_float32_features_keep_their_direction_in_knn():
    from slice2vol.eval.knn import l2_normalize

    # the squared norm of 1e30 overflowed float32: the row became 0 (every neighbour equally far)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(l2_normalize(np.array([[3e30, 4e30], [1.0, 0.0]])), [[0.6, 0.8], [1.0, 0.0]])


LABELS = pd.DataFrame({"age": [20.5, 31.25, 47.0, 55.5, 62.75, 70.0], "sex": ["M", "F", "F", "M", "F", "M"]},
                      index=IDS)
NOISE = np.random.default_rng(0).normal(size=6)


@pytest.mark.parametrize("suffix,columns,entry,warning", [
    (".csv", {"Age": NOISE}, {}, "column 'Age' is named like the label 'age' being probed (a copy of the answer); "
                                 "exclude it (features entry 'x': exclude: [Age])"),
    (".csv", {"sex_code": NOISE}, {}, "column 'sex_code' is named like the label 'sex'"),
    (".csv", {"v": NOISE, "months": LABELS.age.to_numpy() * 12}, {"columns": ["v", "months"]},
     "column 'months' holds the values of the label 'age' being probed (a copy of the answer); remove it from "
     "columns of features entry 'x'"),
    (".csv", {"v": NOISE, "g": (LABELS.sex == "F").astype(int).to_numpy()}, {},
     "column 'g' holds the values of the label 'sex' being probed (a copy of the answer); exclude it (features entry "
     "'x': exclude: [g])"),
    (".npz", {"v": NOISE, "age": LABELS.age.to_numpy()}, {},
     "column 'f1' holds the values of the label 'age' being probed (a copy of the answer); leave column 1 out of X"),
    (".csv", {"v": NOISE, "stage": NOISE + 1}, {}, None),
], ids=["same-name", "name-part", "other-units", "recoded-classes", "npz-values", "no-copy"])
def test_a_feature_column_that_is_a_probed_label_is_flagged(tmp_path, caplog, suffix, columns, entry, warning):
    path = write(tmp_path / f"leak{suffix}", columns)
    with caplog.at_level(logging.WARNING, logger="slice2vol.eval.baselines"):
        read(path, labels=LABELS, **entry)
    lines = [r.getMessage() for r in caplog.records]
    if warning is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith(f"{path}: ") and warning in lines[0]


def test_complex_features_are_refused(tmp_path):
    path = tmp_path / "complex.npz"
    np.savez(path, ids=np.array(IDS), X=np.ones((6, 2)) + 1j * np.arange(12).reshape(6, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's ComplexWarning, then the imaginary part dropped
        with pytest.raises(ValueError, match=r"^.*complex.npz: 'X' holds complex numbers \(complex128\); save real "
                                             r"features") as err:
            read(path)
    assert "\n" not in str(err.value)


def test_a_features_file_that_is_a_named_pipe_is_refused_not_waited_on(tmp_path):
    import os

    os.mkfifo(tmp_path / "f.csv")
    with pytest.raises(ValueError, match=r"f.csv: a named pipe \(FIFO\), not a regular file \(features entry"):
        read(tmp_path / "f.csv")


def test_small_classes_give_no_raw_sklearn_warnings(caplog):
    from slice2vol.eval.linear import LinearConfig, LinearProbe
    from slice2vol.eval.splits import SplitConfig, make_splits

    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "The least populated class in y has only 1 members" (UserWarning)
        # a class with one subject in a training fold: the inner split that chooses the penalty
        LinearProbe("classification", LinearConfig(Cs=(1.0, 10.0), inner_folds=2)).fit(
            rng.normal(size=(6, 3)), np.array(["a"] * 5 + ["b"]))
        with caplog.at_level(logging.WARNING, logger="slice2vol.eval.splits"):
            make_splits([f"s{i}" for i in range(9)], ["a"] * 7 + ["b"] * 2, "categorical",
                        cfg=SplitConfig(n_folds=3, n_repeats=1), label="dx")
    # the label and the class are named (fuzz round 14: "a class has ..." named neither)
    assert [r.getMessage() for r in caplog.records] == ["label 'dx': class(es) b (2) have fewer subjects than the 3 "
                                                        "folds; some test folds lack them"]


@pytest.mark.parametrize("content,ids,first", [
    # surrounding spaces, as manifests strip them: "none of its 2 IDs is a subject of the cohort"
    ("MRID,a\n s00 ,1.5\ns01 ,2\n", ["s00", "s01"], [1.5]),
    # a spreadsheet's ';', decimal commas and blank padding rows, as manifests read them: "non-numeric values in
    # column(s) ['a']"
    ("MRID;a;b\ns00;1,5;-2\ns01;2,25;3,5\n;;\n;;\n", ["s00", "s01"], [1.5, -2.0]),
    # IDs with leading zeros stay text
    ("MRID,a\n001,1\n002,2\n", ["001", "002"], [1.0]),
], ids=["id-spaces", "semicolon-decimal-comma", "leading-zeros"])
def test_tables_are_read_as_manifests_are(tmp_path, content, ids, first):
    path = tmp_path / "t.csv"
    path.write_text(content)
    es = read(path, ids=ids)
    assert es.ids == ids
    np.testing.assert_allclose(es.X[0], first)


@pytest.mark.parametrize("content,message", [
    ("MRID,f1,f1 \ns00,1,2\ns01,2,3\n", "column name(s) ['f1'] appear more than once in the header (spaces around "
                                        "names are ignored); rename them"),
    ('MRID,a\ns00,"1,5"\ns01,2\n', "non-numeric values in column(s) ['a'] (e.g. ['1,5']); decimal commas? write 1.5, "
                                   "or separate the cells with ';' as spreadsheets then do"),
    ("MRID;a\ns00;1,5E-3\ns01;2\n", "non-numeric values in column(s) ['a'] (e.g. ['1,5E-3']); decimal commas are read "
                                    "only in a column where every cell is a number like 1,5"),
    ("MRID,a,b\ns00,x,1\ns01,,2\n", "non-numeric values in column(s) ['a'] (e.g. ['x'])"),  # was left out, unsaid
], ids=["repeated-name", "quoted-decimal-comma", "semicolon-exponent", "text-beside-empty-cell"])
def test_bad_tables_get_one_line_errors(tmp_path, content, message):
    path = tmp_path / "t.csv"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        read(path, ids=["s00", "s01"])
    assert str(err.value) == f"{path}: {message}"

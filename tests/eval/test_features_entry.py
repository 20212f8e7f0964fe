"""A brought-in feature table with missing values (fuzz round 6, F11): it shrank every set's
comparison with a warning only (exit 0), and a column with no value at all emptied the benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from slice2vol.cli import main
from tests.eval.test_runner import blob_cohort

REPO = Path(__file__).resolve().parents[2]


def argv(manifest: Path, out: Path, table: Path, *extra: str) -> list[str]:
    return ["bench", "--config", str(REPO / "configs/experiments/ci.yaml"), "--out", str(out), "--no-progress",
            f"cohort.manifest={manifest}", "cohort.labels=[grp]", "tasks=[linear]", "encoders=[]", "encoders3d=[]",
            "baselines={sets: [head_volume], chance: true}", f"features=[{{path: {table}, id_column: MRID}}]",
            "splits={n_folds: 3, n_repeats: 1, seed: 0, n_bins: 2}", "n_bootstrap=20", "n_permutations=10",
            "plots=[]", *extra]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return blob_cohort(tmp_path_factory.mktemp("blobs"))


def test_subjects_a_table_lacks_are_failures_of_the_benchmark(manifest, tmp_path, capsys):
    table = pd.read_csv(manifest.parent / "regions.csv")
    table.loc[[1, 4], "noise"] = float("nan")
    path = tmp_path / "regions_gaps.csv"
    table.to_csv(path, index=False)
    out = tmp_path / "run"
    assert main(argv(manifest, out, path)) == 1  # was 0, with a warning line only
    err = capsys.readouterr().err
    for sid in ("s01", "s04"):
        assert (f"{sid}: {path}: no finite value in column(s) ['noise'] of features entry 'regions_gaps'; left out "
                "of every set's comparison") in err
    data = json.loads((out / "results.json").read_text())
    # the comparison is paired: every set on the same 10 subjects, and the two are listed
    assert {r["n_subjects"] for r in data["rows"]} == {10}
    assert sum("regions_gaps" in f for f in data["cohort"]["failures"]) == 2


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

"""The experiment config and the bench command line refuse values no run can honour, when loaded.

Each case below used to be found only after the caching stage (a traceback or a library's text naming
no key), or was silently changed (fuzz round 8, H8 and H9): now the config is refused before any work,
with one line naming the key and the rule.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from slice2vol.cli import main
from slice2vol.commands._common import seed_type
from slice2vol.eval.experiment import load_experiment

CI = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "ci.yaml"
GRID = "must hold at least one value, each finite and > 0"


@pytest.mark.parametrize("override, message", [
    ("linear.Cs=[]", f"linear.Cs {GRID}, got []"),
    ("linear.alphas=[]", f"linear.alphas {GRID}, got []"),
    ("linear.Cs=[0]", f"linear.Cs {GRID}, got [0.0]"),
    ("linear.Cs=[-1]", f"linear.Cs {GRID}, got [-1.0]"),
    ("linear.Cs=[.nan]", f"linear.Cs {GRID}, got [nan]"),
    ("linear.alphas=[-5]", f"linear.alphas {GRID}, got [-5.0]"),
    ("linear.inner_folds=1", "linear.inner_folds must be a whole number >= 2, got 1"),
    ("linear.inner_folds=-3", "linear.inner_folds must be a whole number >= 2, got -3"),
    ("linear.max_iter=0", "linear.max_iter must be a whole number >= 1, got 0"),
    ("splits.seed=-1", "splits.seed must be a whole number from 0 to 2**32 - 1, got -1"),
    ("seed=4294967296", "seed must be a whole number from 0 to 2**32 - 1, got 4294967296"),
    ("tasks=[]", "tasks must name at least one task (e.g. tasks=[knn,linear]), got []"),
    # fuzzer: every p and p_holm 1.0 ("not significant" where nothing was tested), NaN intervals with exit 0,
    # n - 3 subjects (pandas head(-3)) and all subjects, silently
    ("n_permutations=0", "n_permutations must be a whole number >= 1, got 0"),
    ("n_bootstrap=0", "n_bootstrap must be a whole number >= 1, got 0"),
    ("cohort.max_subjects=-3", "cohort.max_subjects must be a whole number >= 1 or null (all subjects), got -3"),
    ("cohort.max_subjects=0", "cohort.max_subjects must be a whole number >= 1 or null (all subjects), got 0"),
])
def test_a_value_no_run_can_honour_is_refused_at_load(override, message):
    with pytest.raises(ValueError) as info:
        load_experiment(CI, [override])
    # the file and the override that brought the value (fuzz round 12: neither was named)
    assert str(info.value) == f"{CI}: override {override!r}: {message}"


def test_a_bad_value_in_the_file_and_an_unknown_aggregator_name_the_file(tmp_path):
    import yaml

    data = yaml.safe_load(CI.read_text())
    data["splits"] = {**(data.get("splits") or {}), "n_folds": 1}
    (tmp_path / "folds.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError) as info:
        load_experiment(tmp_path / "folds.yaml")
    assert str(info.value) == f"{tmp_path / 'folds.yaml'}: splits.n_folds must be a whole number >= 2, got 1"
    data = yaml.safe_load(CI.read_text())
    data["encoders"][0]["aggregators"] = ["mean", "bogus"]
    (tmp_path / "agg.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'agg.yaml'))}: encoder '[^']+': unknown "
                                         r"aggregator\(s\) \['bogus'\]; known: fusion, gem, "):
        load_experiment(tmp_path / "agg.yaml")


@pytest.mark.parametrize("override, expected", [("cohort.max_subjects=null", None), ("cohort.max_subjects=1", 1),
                                                ("n_permutations=1", 1), ("n_bootstrap=1", 1)])
def test_the_smallest_valid_counts_are_accepted(override, expected):
    cfg, _ = load_experiment(CI, [override])
    key = override.split("=")[0]
    assert (cfg.cohort.max_subjects if key.startswith("cohort.") else getattr(cfg, key)) == expected


def test_yaml_1_2_numbers_reach_the_experiment_as_numbers():
    cfg, _ = load_experiment(CI, ["linear.Cs=[1e-3,1E2]", "ssl_curve={lr: 1e-3}"])
    assert cfg.linear.Cs == (0.001, 100.0)
    assert cfg.task_params["ssl_curve"] == {"lr": 0.001}


def test_bench_refuses_in_one_line_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["bench", "--config", str(CI), "--out", str(out), "--no-progress", "linear.Cs=[]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"slice2vol bench: error: {CI}: override 'linear.Cs=[]': linear.Cs {GRID}, got []"
    assert not out.exists()


@pytest.mark.parametrize("text, value", [("0", 0), ("42", 42), (str(2**32 - 1), 2**32 - 1)])
def test_seed_type_takes_numpy_seeds(text, value):
    assert seed_type(text) == value


@pytest.mark.parametrize("text", ["-1", str(2**32), "99999999999999999999", "1.5", "abc", ""])
def test_seed_type_refuses_what_numpy_cannot_take(text):
    with pytest.raises(argparse.ArgumentTypeError, match="2\\*\\*32 - 1"):
        seed_type(text)


def test_a_seed_flag_out_of_range_names_the_flag(tmp_path, capsys):
    """``--seed 99999999999999999999`` failed inside the job with "Overflow when unpacking long long"."""
    with pytest.raises(SystemExit) as info:
        main(["bench", "--config", str(CI), "--out", str(tmp_path / "run"), "--seed", "99999999999999999999"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "slice2vol bench: error: argument --seed: must be from 0 to 2**32 - 1, got 99999999999999999999")

"""The protocol measurements (``python -m slice2vol.eval.checks``) on tiny settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slice2vol.eval import checks


def test_median_cosine_hand_case():
    # rows in one orthant: raw cosines high; centred, the two pairs point opposite ways
    X = np.array([[10.0, 1.0], [10.0, 2.0], [10.0, 3.0], [10.0, 4.0]])
    raw, centred = checks.median_cosine(X)
    Z = X / np.linalg.norm(X, axis=1, keepdims=True)
    expect = np.median((Z @ Z.T)[np.triu_indices(4, 1)])
    assert raw == pytest.approx(expect) and raw > 0.98
    # centred rows are (0, -1.5), (0, -0.5), (0, 0.5), (0, 1.5): cosines +-1, four of the six pairs -1
    assert centred == pytest.approx(-1.0)


@pytest.mark.slow  # ~2 min on the loaded 2-core machine; tests/eval/test_nested.py covers the behaviour in CI
def test_noise_mil_rows_for_both_fits(tmp_path, capsys):
    ids = [f"s{i:02d}" for i in range(20)]
    y = np.array(["F", "M"] * 10)
    rows = checks.noise_mil(ids, y, "sex", [0], {"hidden": 8, "attn_dim": 4, "epochs": 2, "lr": 0.003}, tmp_path,
                            n_folds=4, n_boot=10)
    assert {(r["task"], r["encoder"]) for r in rows} == {(t, s) for t in ("knn", "linear")
                                                         for s in ("mil inside folds", "mil on all subjects")}
    assert all(0.0 <= r["fold_mean"] <= 1.0 and 0.0 <= r["pooled"] <= 1.0 for r in rows)
    lines = checks._summarise(rows)
    assert any("mil inside folds" in line and "pooled" in line for line in lines)


@pytest.mark.slow
def test_cli_pooled_vs_fold_mean(capsys):
    assert checks.main(["pooled-vs-fold-mean", "--n", "20", "--seeds", "0", "--dim", "8"]) == 0
    out = capsys.readouterr().out
    assert "20 subjects, label sex (F: 10, M: 10)" in out and "linear" in out and "fold mean" in out


def test_scan_margins_hand_case():
    """Five points on a line at 0, 1, 3, 6, 10 plus a copy of the first at 0.001: nearest-neighbour
    distances 0.001, 0.001, 0.999, 2, 3, 4 (median 1.4995); the copy 0.001 / 1.4995; among the others
    (1, 3, 6, 10 and the copy's partner removed too) the closest pair is 1 and 3 (2 / 1.4995)."""
    ids = ["a", "b", "c", "d", "e", "a2"]
    X = np.array([[0.0], [1.0], [3.0], [6.0], [10.0], [0.001]])
    m = checks.scan_margins(ids, X, ("a", "a2"))
    assert m["n"] == 6 and m["median_nn"] == pytest.approx(1.4995)
    assert m["copy"] == pytest.approx(0.001 / 1.4995)
    assert m["closest_distinct"] == pytest.approx(2 / 1.4995) and m["closest_ids"] == ["b", "c"]


@pytest.mark.slow  # ~25 s: tests/eval/test_same_scans.py covers the bench's side in CI
def test_cli_same_scans_on_the_ci_config(tmp_path, capsys):
    config = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "ci.yaml"
    assert checks.main(["same-scans", "--config", str(config), "--out", str(tmp_path),
                        "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "copy-of-synth-00-000 is synth-00-000 saved again as .nii; bench left out: " \
           "[['copy-of-synth-00-000', 'synth-00-000']]" in out
    import json

    sets = json.loads((tmp_path / "m.json").read_text())["sets"]
    assert len(sets) == 2 and all(m["copy"] < 1e-3 < m["closest_distinct"] for m in sets.values())


@pytest.mark.parametrize("argv, message", [
    (["noise-mil", "--seeds", "-1"], "argument --seeds: must be from 0 to 2**32 - 1, got -1"),
    (["noise-mil", "--n", "0"], "argument --n: must be >= 10, got 0"),
    (["noise-mil", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["pooled-vs-fold-mean", "--dim", "zero"], "argument --dim: expected a whole number >= 1, got 'zero'"),
])
def test_check_options_out_of_range_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        checks.main(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err

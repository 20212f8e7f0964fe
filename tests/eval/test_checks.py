"""The protocol measurements (``python -m slice2vol.eval.checks``) on tiny settings."""

from __future__ import annotations

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

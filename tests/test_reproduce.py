"""scripts/reproduce: the README table renderer lays out a run's summary without changing a number."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "reproduce" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summary(encoder, label, metric, est, lo, hi, delta=None, dlo=None, dhi=None, p=None):
    return {"encoder": encoder, "label": label, "task": "linear", "variant": "logistic", "metric": metric,
            "estimate": est, "ci_low": lo, "ci_high": hi, "estimate_kind": "pooled", "delta": delta,
            "delta_ci_low": dlo, "delta_ci_high": dhi, "p_holm": p, "lower_is_better": metric == "mae"}


def test_readme_tables_lay_out_the_summary(tmp_path, capsys):
    results = {"reference": "a/mean", "cohort": {"n_subjects": 48}, "summary": [
        _summary("a/mean", "sex", "roc_auc", 0.98312, 0.95, 1.0, 0.0),
        _summary("b/mean", "sex", "roc_auc", 0.9, 0.8, 0.97, -0.08312, -0.15, -0.01, 0.0004),
        _summary("a/mean", "age", "mae", 7.4712, 5.98, 9.07, 0.0),
        _summary("b/mean", "age", "mae", 13.5, 10.9, 15.9, 6.02888, 3.1, 8.8, 0.0123),
    ]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    module = _load("readme_tables")
    assert module.main([str(tmp_path), "--labels", "sex", "age"]) == 0
    out = capsys.readouterr().out
    assert "| a/mean | 0.983 [0.950, 1.000] | 7.47 [5.98, 9.07] |" in out
    assert "| b/mean | -0.083 [-0.150, -0.010], <0.001 | +6.029 [3.100, 8.800], 0.012 |" in out
    assert "| a/mean | reference | reference |" in out and "48 subjects" in out
    with pytest.raises(SystemExit, match="'site' is not in the summary"):
        module.tables(results, ["site"])


def test_readme_tables_without_a_run_is_one_line_exit_2(tmp_path, capsys):
    assert _load("readme_tables").main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no results.json" in err

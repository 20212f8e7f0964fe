"""The probe-only entry point: bad input is one line on stderr with exit 2; console lines of results."""

from __future__ import annotations

import math

from slice2vol.eval.dense_run import main, summary_lines


def test_missing_config_is_one_line_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["--config", str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.yaml" in err[0]


def test_config_without_probe_tasks_is_refused(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("name: x\ncohort: {synthetic: {n_subjects: 4}}\ntasks: [knn]\n")
    assert main(["--config", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "no probe task" in capsys.readouterr().err


def test_summary_lines():
    row = {"task": "segmentation", "label": "wm", "encoder": "imagenet", "variant": "multilayer", "metric": "dice",
           "estimate": 0.81234, "ci_low": 0.8, "ci_high": 0.82, "n_subjects": 48}
    pair = {"task": "segmentation", "label": "wm", "encoder": "imagenet", "reference": "random", "metric": "dice",
            "delta": 0.1, "ci_low": 0.05, "ci_high": 0.15, "p_holm": math.nan}
    lines = summary_lines({"rows": [row], "paired": [pair], "skipped": [{"name": "anomaly", "reason": "few"}]})
    assert "0.812 [0.800, 0.820] n=48" in lines[0]
    assert "delta +0.100 [+0.050, +0.150]" in lines[1]
    assert lines[2] == "skipped: anomaly: few"

"""``scripts/eval_encoders3d.py`` end to end on 8 synthetic heads whose size carries sex and age."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd

from tests.conftest import write_nifti
from tests.encoders3d.conftest import SPACING_2MM, head

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "eval_encoders3d.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("eval_encoders3d", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_script_scores_and_times_an_encoder(tmp_path, capsys):
    rows = []
    for i in range(8):
        big = i % 2  # "M" heads are larger, older subjects too
        shape = (26 + 4 * big + i // 2, 30 + 4 * big, 24 + 4 * big)
        write_nifti(tmp_path / f"s{i}.nii.gz", head(shape, seed=i), SPACING_2MM)
        rows.append({"subject_id": f"s{i}", "t1": f"s{i}.nii.gz", "sex": "FM"[big], "age": 30.0 + 5 * i + 10 * big})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    script = _load_script()
    argv = ["--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out"), "--encoders", "",
            "--set", "r10=3d/monai_resnet10:random", "--kwargs", "r10.input_size=[32,32,32]",
            "--kwargs", "r10.levels=[-1]", "--folds", "2", "--repeats", "1", "--n-bootstrap", "50", "--no-progress"]
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert "| r10 (`3d/monai_resnet10`" in out and "predict the training-fold mean age" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    row = results["rows"][0]
    assert row["dim"] == 512 and row["n"] == 8 and row["seconds_per_volume"] > 0
    auc, lo, hi = row["sex_auc"]
    assert 0 <= lo <= auc <= hi <= 1
    assert row["age_mae"][0] > 0 and results["age_mae_predict_mean"] > 0
    # a second run reuses the stored embeddings: nothing of the store (compacted .h5 or parts) is rewritten
    def store_files():
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("r10.h5*") if p.is_file()} | {
            p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("r10.h5.parts/*.h5")}

    before = store_files()
    assert before and script.main(argv) == 0
    assert store_files() == before

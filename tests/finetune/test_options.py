"""Fine-tuning options are checked when the config is read, before any slice is cut: a SimCLR batch
of one trained nothing (loss 0) and still wrote an encoder, a label was ignored by the label-free
objective, steps=0 or lr<0 were run as given (fuzz round 9)."""

from __future__ import annotations

import pytest

from slice2vol.cli import main


@pytest.mark.parametrize("override, message", [
    (["train.batch_size=1"], "train.batch_size must be >= 2 for the simclr objective"),
    (["--label", "sex"], "label 'sex' is not used by the simclr objective (label free): drop --label, or train "
                         "on it with --objective supervised"),
    (["train.steps=0"], "train.steps must be a whole number >= 1, got 0"),
    (["train.lr=-1"], "train.lr must be a finite number > 0, got -1"),
    (["train.temperature=0"], "train.temperature must be a finite number > 0, got 0"),
    (["lora.rank=0"], "lora.rank must be a whole number >= 1, got 0"),
    (["lora.dropout=1.0"], "lora.dropout must be a finite number in [0, 1), got 1.0"),
    (["data.planes=[]"], "data.planes must name at least one plane, got []"),
    (["data.slices_per_subject=0"], "data.slices_per_subject must be a whole number >= 1, got 0"),
])
def test_bad_finetune_options_are_one_line_usage_errors(tmp_path, capsys, override, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject_id,t1,sex\ns0,s0.nii.gz,F\n")
    code = main(["finetune", "--config", "finetune/cpu_smoke", "--manifest", str(manifest), "--no-progress",
                 "--out", str(tmp_path / "out"), *override])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("slice2vol finetune: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out" / "encoder.safetensors").exists()

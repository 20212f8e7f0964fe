"""A fine-tuning entry is fitted on each training fold only: its runs never see a test subject."""

from __future__ import annotations

import json
from pathlib import Path

from slice2vol.cli import main
from tests.eval.test_runner import blob_cohort

REPO = Path(__file__).resolve().parents[2]
FT = ("{name: ft, aggregator: mean, batch_size: 16, finetune: {encoder: timm/vit_small_patch16_224, weights: random,"
      " encoder_kwargs: {img_size: 32, model_kwargs: {depth: 1}}, mode: lora, objective: supervised,"
      " lora: {rank: 2, alpha: 4.0}, data: {planes: [axial], stride: 4, slice_size: 32, slices_per_subject: 2},"
      " train: {steps: 2, batch_size: 4}}}")


def test_supervised_finetuning_inside_folds(tmp_path):
    manifest = blob_cohort(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["bench", "--config", str(REPO / "configs/experiments/ci.yaml"), "--out", str(out), "--no-progress",
            f"cohort.manifest={manifest}", "cohort.labels=[grp]", "tasks=[linear]", "encoders=[]", f"finetune=[{FT}]",
            "baselines.chance=false", "splits={n_folds: 3, n_repeats: 1, seed: 0, n_bins: 2}", "n_bootstrap=20",
            "n_permutations=10", "plots=[]"]
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    fitted = data["sets"]["ft/mean"]["fitted"]
    assert fitted["scope"] == "inside folds" and fitted["labels"] == ["grp"]
    splits = json.loads(next((out / "splits").glob("grp-*.json")).read_text())
    records = [json.loads(p.read_text()) for p in (out / "finetune").glob("*/finetune.json")]
    assert len(records) == 3
    trained = sorted(sorted(r["trained_subjects"]) for r in records)
    assert trained == sorted(sorted(f["train"]) for f in splits["folds"])
    for r, fold in zip(sorted(records, key=lambda r: sorted(r["trained_subjects"])),
                       sorted(splits["folds"], key=lambda f: sorted(f["train"]))):
        assert not set(r["trained_subjects"]) & set(fold["test"]) and r["label"] == "grp"
    assert [r for r in data["rows"] if r["encoder"] == "ft/mean" and r["metric"] == "roc_auc"]

"""Per-set disclosure of 3D SSL pretraining, its options, and checkpoints keyed by config AND cohort."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tests._tiny_encoder  # noqa: F401  - registers test/tiny_cnn
from slice2vol.cli import main
from tests.eval.test_runner import blob_cohort

REPO = Path(__file__).resolve().parents[2]
SSL = ("{method: simclr, spatial_dims: 3, backbone: {name: cnn, params: {width: 4, num_stages: 2}},"
       " method_params: {proj_hidden: 16, proj_dim: 8},"
       " data: {volume_size: [16, 16, 16], crop_size: [12, 12, 12], min_foreground: 0.0},"
       " train: {steps: 2, batch_size: 4, warmup_steps: 1, checkpoint_every: 2, log_every: 1, device: cpu, amp: false}}")


def argv(manifest: Path, out: Path, *extra: str) -> list[str]:
    return ["bench", "--config", str(REPO / "configs/experiments/ci.yaml"), "--out", str(out), "--no-progress",
            f"cohort.manifest={manifest}", "cohort.labels=[grp]", "tasks=[linear]", "encoders=[]",
            f"encoders3d=[{{name: ssl3d, input_size: [16, 16, 16], ssl: {SSL}}}]", "baselines.chance=false",
            "splits={n_folds: 3, n_repeats: 1, seed: 0, n_bins: 2}", "n_bootstrap=20", "n_permutations=10",
            "plots=[]", *extra]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return blob_cohort(tmp_path_factory.mktemp("blobs"))


def test_ssl_on_the_cohort_is_disclosed_and_keyed_by_cohort(manifest, tmp_path):
    out = tmp_path / "run"
    assert main(argv(manifest, out)) == 0
    data = json.loads((out / "results.json").read_text())
    pre = data["sets"]["ssl3d"]["pretraining"]
    assert pre["n_subjects"] == 12 and pre["n_in_test_folds"] == 12 and pre["labels"] is False
    assert any("pretrained on 12 subjects, 12 of them in test folds, no labels" in n for n in data["notes"])
    runs = sorted(p.name for p in (out / "ssl").iterdir())
    assert len(runs) == 1
    # the same SSL config on another cohort in the same --out: a new run, never the old model
    assert main(argv(manifest, out, "cohort.max_subjects=9")) == 0
    assert len(list((out / "ssl").iterdir())) == 2
    again = json.loads((out / "results.json").read_text())
    assert again["sets"]["ssl3d"]["pretraining"]["n_subjects"] == 9


def test_ssl_pretrained_on_training_folds_never_sees_test_images(manifest, tmp_path):
    out = tmp_path / "run"
    assert main(argv(manifest, out, "encoders3d.0.pretrain_on=training_folds")) == 0
    data = json.loads((out / "results.json").read_text())
    entry = data["sets"]["ssl3d"]
    assert entry["fitted"]["scope"] == "inside folds" and entry["fitted"]["labels"] == []
    assert entry["pretraining"] is None
    runs = list((out / "ssl").iterdir())
    assert len(runs) == 3  # one pretraining per training fold
    splits = json.loads(next((out / "splits").glob("grp-*.json")).read_text())
    train_sets = sorted(sorted(f["train"]) for f in splits["folds"])
    assert all(len(t) == 8 for t in train_sets)  # 12 subjects, 3 folds: 8 training subjects each
    assert any(r["encoder"] == "ssl3d" for r in data["rows"])


def test_ssl_on_another_manifest(manifest, tmp_path):
    import pandas as pd

    other = blob_cohort(tmp_path / "other", n=6)
    table = pd.read_csv(other)
    table["subject_id"] = "x" + table["subject_id"]  # another cohort: no subject in common
    table.to_csv(other, index=False)
    out = tmp_path / "run"
    assert main(argv(manifest, out, "encoders3d.0.pretrain_on=manifest",
                     f"encoders3d.0.pretrain_manifest={other}")) == 0
    pre = json.loads((out / "results.json").read_text())["sets"]["ssl3d"]["pretraining"]
    assert pre["n_subjects"] == 6 and pre["n_in_test_folds"] == 0 and pre["source"] == "manifest manifest.csv"

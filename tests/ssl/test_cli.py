import json

import numpy as np
import pytest
import yaml

from slice2vol.cache import FeatureStore
from slice2vol.cli import main


def test_pretrain_then_embed_in_process(blob_manifest, tmp_path, capsys):
    config = tmp_path / "rot.yaml"
    config.write_text(yaml.safe_dump({
        "method": "simclr", "backbone": {"name": "cnn", "params": {"width": 8, "num_stages": 3}},
        "data": {"volume_size": [32, 32, 32], "crop_size": [24, 24, 24]},
        "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "device": "cpu"}}))
    out = tmp_path / "run"
    argv = ["pretrain", "--method", "rotation", "--dims", "3", "--config", str(config), "--manifest",
            str(blob_manifest), "--out", str(out), "--no-progress", "train.lr=0.01"]
    assert main(argv) == 0
    meta = json.loads((out / "last" / "meta.json").read_text())
    assert meta["method"] == "rotation" and meta["step"] == 2 and meta["config"]["train"]["lr"] == 0.01
    store = tmp_path / "ssl.h5"
    assert main(["embed", "--checkpoint", str(out / "last"), "--manifest", str(blob_manifest), "--store",
                 str(store), "--name", "ssl3d/rotation", "--no-progress", "--device", "cpu"]) == 0
    ids, X, prov = FeatureStore(store).volume_embeddings("ssl3d/rotation")
    assert ids == ["s0", "s1", "s2"] and X.shape == (3, 32) and np.isfinite(X).all()
    assert prov["input_size"] == [32, 32, 32]  # default: the training volume_size
    assert "wrote 'ssl3d/rotation', 3 subjects" in capsys.readouterr().out


def test_bad_method_and_2d_embed_are_usage_errors(blob_manifest, tmp_path, capsys):
    assert main(["pretrain", "--method", "byol", "--manifest", str(blob_manifest), "--out",
                 str(tmp_path / "x"), "--no-progress"]) == 2
    assert "unknown ssl method 'byol'" in capsys.readouterr().err


def test_pretrain_cli_convention_overrides_with_list_indices_and_subjects(blob_manifest, tmp_path, capsys):
    config = tmp_path / "simclr.yaml"
    config.write_text(yaml.safe_dump({
        "method": "autoencoder", "backbone": {"name": "cnn", "params": {"width": 8, "num_stages": 3}},
        "method_params": {"decoder_min_width": 8},
        "data": {"volume_size": [32, 32, 32], "crop_size": [24, 24, 24]},
        "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "device": "cuda:7"}}))
    subjects = tmp_path / "train_ids.txt"
    subjects.write_text("# training folds\ns0\ns2\n")
    out = tmp_path / "run"
    argv = ["pretrain", "--config", str(config), "--manifest", str(blob_manifest), "--out", str(out),
            "--device", "cpu", "--subjects", str(subjects), "--no-progress", "data.crop_size.2=16", "train.seed=3"]
    assert main(argv) == 0
    meta = json.loads((out / "last" / "meta.json").read_text())
    assert meta["config"]["data"]["crop_size"] == [24, 24, 16] and meta["config"]["train"]["seed"] == 3
    assert meta["config"]["train"]["device"] == "cpu" and meta["subject_ids"] == ["s0", "s2"]
    assert meta["compute"]["flops_per_step"] > 0 and (out / "slice2vol.log").exists()
    printed = capsys.readouterr().out
    assert "2/2 steps" in printed and "FLOPs/step" in printed
    # a bad override and an unknown key are one-line usage errors
    assert main(["pretrain", "--manifest", str(blob_manifest), "--out", str(out), "--no-progress", "train.lr"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["pretrain", "--manifest", str(blob_manifest), "--out", str(out), "--no-progress",
                 "train.learning_rate=1"]) == 2
    assert "unknown key(s) ['learning_rate']" in capsys.readouterr().err

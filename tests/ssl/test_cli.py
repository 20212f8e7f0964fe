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

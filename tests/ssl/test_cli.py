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
    # an ID the --subjects file names but the manifest lacks: the file is named (was the manifest)
    subjects.write_text("s0\nnobody\n")
    assert main([*argv[:-2], "--no-resume"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{subjects}: 1 subject ID(s) not in the manifest, e.g. ['nobody']")


def _tiny_run(blob_manifest, tmp_path):
    config = tmp_path / "rot.yaml"
    config.write_text(yaml.safe_dump({
        "method": "rotation", "backbone": {"name": "cnn", "params": {"width": 8, "num_stages": 3}},
        "data": {"volume_size": [32, 32, 32], "crop_size": [24, 24, 24]},
        "train": {"steps": 1, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "device": "cpu"}}))
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--manifest", str(blob_manifest), "--out", str(out),
                 "--no-progress"]) == 0
    return out / "last"


@pytest.mark.parametrize("mode", ["whole", "sliding"])
def test_embed_checkpoint_again_embeds_only_what_changed(mode, blob_manifest, tmp_path, capsys):
    """A second `embed --checkpoint` run keeps the unchanged subjects' rows, embeds a subject whose file
    changed, keeps a subject missing from the manifest; the rows equal ssl.export.embed_cohort's."""
    import os

    import pandas as pd

    from slice2vol.data.manifest import load_manifest
    from slice2vol.ssl.export import embed_cohort, load_encoder

    last = _tiny_run(blob_manifest, tmp_path)
    store = tmp_path / "ssl.h5"
    argv = ["embed", "--checkpoint", str(last), "--manifest", str(blob_manifest), "--store", str(store),
            "--mode", mode, "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    ids, X, prov = FeatureStore(store).volume_embeddings("ssl3d/rotation")
    reference = tmp_path / "reference.h5"
    size = (24, 24, 24) if mode == "sliding" else (32, 32, 32)
    embed_cohort(load_encoder(last), load_manifest(blob_manifest), reference, "ref", input_size=size, mode=mode,
                 progress=False)
    ref_ids, ref_X, _ = FeatureStore(reference).volume_embeddings("ref")
    assert ids == ref_ids == ["s0", "s1", "s2"]
    np.testing.assert_allclose(X, ref_X, rtol=1e-5, atol=1e-6)
    assert prov["encoder_info"]["extra"]["mode"] == mode and prov["input_size"] == list(size)
    capsys.readouterr()

    # s1's file is rewritten (other content), s2 leaves the manifest
    table = pd.read_csv(blob_manifest)
    s0 = table.loc[table.subject_id == "s0", "t1"].item()
    s1 = table.loc[table.subject_id == "s1", "t1"].item()
    os.replace(s0, tmp_path / "s0.nii.gz")
    os.replace(s1, s0)
    os.replace(tmp_path / "s0.nii.gz", s1)
    table[table.subject_id != "s2"].to_csv(blob_manifest, index=False)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 embedded, 1 kept from before" in out
    ids2, X2, prov2 = FeatureStore(store).volume_embeddings("ssl3d/rotation")
    assert ids2 == ["s0", "s1", "s2"]
    assert prov2["n_embedded"] == 2 and prov2["n_unchanged"] == 0  # both files changed (swapped)
    np.testing.assert_allclose(X2[0], X[1], rtol=1e-5, atol=1e-6)  # s0 now holds s1's old image
    np.testing.assert_allclose(X2[2], X[2])  # kept from before
    assert "kept from before (not in this run's manifest): s2" in out

    assert main(argv) == 0  # nothing changed: nothing embedded
    assert FeatureStore(store).volume_embeddings("ssl3d/rotation")[2]["n_unchanged"] == 2
    assert "0 embedded, 2 unchanged, 1 kept from before" in capsys.readouterr().out


def test_embed_checkpoint_with_other_settings_needs_replace(blob_manifest, tmp_path, capsys):
    last = _tiny_run(blob_manifest, tmp_path)
    store = tmp_path / "ssl.h5"
    argv = ["embed", "--checkpoint", str(last), "--manifest", str(blob_manifest), "--store", str(store),
            "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv + ["--mode", "sliding"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ssl3d/rotation" in err and "--replace" in err
    assert main(argv + ["--mode", "sliding", "--replace"]) == 0
    assert FeatureStore(store).volume_embeddings("ssl3d/rotation")[2]["encoder_info"]["extra"]["mode"] == "sliding"
    assert main(argv + ["--sliding-window"]) == 2
    assert "an SSL checkpoint takes --mode sliding" in capsys.readouterr().err

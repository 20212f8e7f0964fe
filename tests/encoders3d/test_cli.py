"""``slice2vol embed`` with registered 3D encoders, in-process (exit codes, store contents, messages)."""

from __future__ import annotations

import numpy as np
import yaml

from slice2vol.cache import FeatureStore
from slice2vol.cli import main
from tests.conftest import fail_subject


def test_embed_a_cohort_with_overrides(head_manifest, tmp_path, capsys):
    store = tmp_path / "feats.h5"
    argv = ["embed", "--encoder", "3d/monai_resnet10", "--manifest", str(head_manifest), "--store", str(store),
            "--device", "cpu", "--no-progress", "kwargs.levels=[-1]", "kwargs.input_size=[32,32,32]"]
    assert main(argv) == 0
    ids, X, prov = FeatureStore(store).volume_embeddings("3d/monai_resnet10")
    assert list(ids) == ["s0", "s1", "s2", "s3"] and X.shape == (4, 512)
    assert prov["command"] == "slice2vol embed" and prov["encoder_info"]["levels"] == [4]
    out = capsys.readouterr().out
    assert "wrote '3d/monai_resnet10', 4 subjects x 512" in out and "weights random:seed=0" in out


def test_embed_from_a_config_file_with_a_name_and_sliding_windows(head_manifest, tmp_path):
    config = tmp_path / "enc.yaml"
    config.write_text(yaml.safe_dump({"key": "3d/monai_resnet10", "kwargs": {"levels": [-1], "input_size": [32, 32, 64]}}))
    store = tmp_path / "feats.h5"
    assert main(["embed", "--config", str(config), "--manifest", str(head_manifest), "--store", str(store),
                 "--name", "r10-sw", "--sliding-window", "--no-progress", "sliding_window.roi_size=[32,32,32]",
                 "sliding_window.overlap=0"]) == 0
    _, X, prov = FeatureStore(store).volume_embeddings("r10-sw")
    assert X.shape == (4, 512) and np.isfinite(X).all() and prov["mode"] == "sliding"


def test_usage_errors_exit_2_with_one_line(head_manifest, tmp_path, capsys):
    store = str(tmp_path / "f.h5")
    assert main(["embed", "--encoder", "3d/nope", "--manifest", str(head_manifest), "--store", store]) == 2
    assert "unknown 3D encoder '3d/nope'" in capsys.readouterr().err
    assert main(["embed", "--encoder", "3d/monai_resnet10", "--weights", str(tmp_path / "missing.pt"),
                 "--manifest", str(head_manifest), "--store", store]) == 2
    assert "missing.pt: weights file not found" in capsys.readouterr().err
    assert main(["embed", "--encoder", "3d/monai_resnet10", "--manifest", str(head_manifest)]) == 2
    assert "needs --store" in capsys.readouterr().err
    assert main(["embed", "--encoder", "3d/monai_resnet10", "--manifest", str(head_manifest), "--store", store,
                 "kwargs.levels"]) == 2
    assert "overrides are KEY=VALUE" in capsys.readouterr().err


def test_a_failed_subject_exits_1_and_keeps_the_others(head_manifest, tmp_path, capsys):
    (head_manifest.parent / "nii" / "s2.nii.gz").write_bytes(b"broken")
    store = tmp_path / "f.h5"
    assert main(["embed", "--encoder", "3d/monai_resnet10", "--manifest", str(head_manifest), "--store", str(store),
                 "--no-progress", "kwargs.levels=[-1]", "kwargs.input_size=[32,32,32]"]) == 1
    assert "failed: s2:" in capsys.readouterr().err
    assert list(FeatureStore(store).volume_embeddings("3d/monai_resnet10")[0]) == ["s0", "s1", "s3"]


def test_list(capsys):
    assert main(["embed", "--list"]) == 0
    out = capsys.readouterr().out
    assert "3d/deepbet" in out and "package|random|file" in out and "3d/monai_resnet18" in out


def test_an_unexpected_error_fails_that_subject_only(head_manifest, tmp_path, capsys, monkeypatch):
    import slice2vol.encoders3d.embed as embed

    fail_subject(monkeypatch, embed, "s1", TypeError("cannot promote void to float32"))
    store = tmp_path / "f.h5"
    assert main(["embed", "--encoder", "3d/monai_resnet10", "--manifest", str(head_manifest), "--store", str(store),
                 "--no-progress", "kwargs.levels=[-1]", "kwargs.input_size=[32,32,32]"]) == 1
    err = capsys.readouterr().err
    assert "failed: s1:" in err and "TypeError: cannot promote void to float32" in err
    assert list(FeatureStore(store).volume_embeddings("3d/monai_resnet10")[0]) == ["s0", "s2", "s3"]


def test_a_sliding_window_out_of_range_is_one_line_exit_2(head_manifest, tmp_path, capsys):
    """roi_size 0 was accepted and failed inside MONAI on the first subject."""
    assert main(["embed", "--encoder", "3d/monai_resnet10", "--manifest", str(head_manifest), "--store",
                 str(tmp_path / "f.h5"), "--sliding-window", "--no-progress", "sliding_window.roi_size=[0,0,0]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sliding_window.roi_size must be 3 window sizes >= 1 voxel" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "f.h5").exists()
